//! XML text for the documents: escaping, and (for tests) reading a document back.

use std::borrow::Cow;

/// `text` escaped for element content and attribute values (`&`, `<`, `>`, `"`, `'`).
/// Callers pass only checked text (normalized addresses, DNS names, validated display
/// names), which holds no control characters XML 1.0 forbids.
pub(super) fn escape(text: &str) -> Cow<'_, str> {
    quick_xml::escape::escape(text)
}

/// The character the reference `&name;` stands for: a character reference (`&#38;`,
/// `&#x26;`) or one of XML's five predefined entities. Any other entity is `None`: no DTD is
/// ever read, so nothing is expanded.
pub(super) fn reference(r: &quick_xml::events::BytesRef<'_>) -> Option<char> {
    if let Some(c) = r.resolve_char_ref().ok().flatten() {
        return Some(c);
    }
    match &**r {
        b"amp" => Some('&'),
        b"lt" => Some('<'),
        b"gt" => Some('>'),
        b"quot" => Some('"'),
        b"apos" => Some('\''),
        _ => None,
    }
}

/// A parsed element, for tests that check documents by element names and values.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(crate) struct Element {
    /// The local name (namespace prefix dropped).
    pub name: String,
    /// Attributes, unescaped, including `xmlns`.
    pub attributes: Vec<(String, String)>,
    /// Child elements in order.
    pub children: Vec<Element>,
    /// The text directly inside, unescaped.
    pub text: String,
}

#[cfg(test)]
impl Element {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> &Element {
        self.children.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no <{name}> in <{}>", self.name))
    }

    /// Every child named `name`.
    pub fn all(&self, name: &str) -> Vec<&Element> {
        self.children.iter().filter(|c| c.name == name).collect()
    }

    /// The text of the child at `path` (names separated by `/`).
    pub fn text_at(&self, path: &str) -> &str {
        path.split('/').fold(self, |e, name| e.child(name)).text.as_str()
    }

    /// The attribute `name`.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Parses `text` (which must be well-formed) into its root element.
#[cfg(test)]
pub(crate) fn parse(text: &str) -> Element {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<Element> = vec![Element::default()];
    let open = |e: &quick_xml::events::BytesStart<'_>| Element {
        name: String::from_utf8(e.local_name().as_ref().to_vec()).unwrap(),
        attributes: e
            .attributes()
            .map(|a| {
                let a = a.expect("well-formed attribute");
                let value =
                    a.normalized_value(quick_xml::XmlVersion::Implicit1_0).expect("attribute value").into_owned();
                (String::from_utf8(a.key.as_ref().to_vec()).unwrap(), value)
            })
            .collect(),
        ..Element::default()
    };
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) => stack.push(open(&e)),
            Event::Empty(e) => {
                let element = open(&e);
                stack.last_mut().unwrap().children.push(element);
            }
            Event::End(_) => {
                let mut element = stack.pop().unwrap();
                element.text = element.text.trim().to_owned();
                stack.last_mut().unwrap().children.push(element);
            }
            Event::Text(t) => stack.last_mut().unwrap().text.push_str(&t.decode().unwrap()),
            Event::GeneralRef(r) => {
                let c = reference(&r).expect("only character references and predefined entities");
                stack.last_mut().unwrap().text.push(c);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(stack.len(), 1, "unclosed elements");
    let mut document = stack.pop().unwrap();
    assert_eq!(document.children.len(), 1, "one root element");
    document.children.pop().unwrap()
}
