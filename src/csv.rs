//! Just enough CSV (RFC 4180) for bulk import and export: comma-separated fields, quoted
//! when they hold commas, quotes or line breaks, with `""` for a quote inside quotes.

/// A record that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct CsvError {
    /// 1-based line where the record starts.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// One parsed record and the line it started on.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    /// 1-based line number.
    pub line: usize,
    /// The fields, unquoted.
    pub fields: Vec<String>,
}

/// Splits `text` into records. Blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Record>, CsvError> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            '"' => {
                return Err(CsvError {
                    line,
                    message: "a quote inside an unquoted field; quote the whole field".into(),
                });
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty() && !was_quoted) {
                    records.push(Record { line: start, fields: std::mem::take(&mut fields) });
                }
                fields.clear();
                was_quoted = false;
                line += 1;
                start = line;
            }
            _ if was_quoted => return Err(CsvError { line, message: "text after a closing quote".into() }),
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(CsvError { line: start, message: "a quoted field is not closed".into() });
    }
    if !field.is_empty() || !fields.is_empty() || was_quoted {
        fields.push(field);
        records.push(Record { line: start, fields });
    }
    Ok(records)
}

/// One field, quoted when it needs to be.
pub fn field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) || value.starts_with(' ') || value.ends_with(' ') {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// A record line (with CRLF, as RFC 4180 has it).
pub fn line(values: &[&str]) -> String {
    let fields: Vec<String> = values.iter().map(|v| field(v)).collect();
    format!("{}\r\n", fields.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<Vec<String>> {
        parse(text).unwrap().into_iter().map(|r| r.fields).collect()
    }

    #[test]
    fn quoted_fields_commas_quotes_and_line_breaks() {
        assert_eq!(fields("a,b\r\n\r\n\"c,d\",\"e\"\"f\"\n"), [vec!["a", "b"], vec!["c,d", "e\"f"]]);
        assert_eq!(fields("\"x\ny\",z"), [vec!["x\ny", "z"]]);
        assert_eq!(parse("a\n\"b\nc\",d\ne").unwrap()[2].line, 4);
        assert_eq!(fields("a,,\n"), [vec!["a", "", ""]]);
    }

    #[test]
    fn broken_quoting_names_the_line() {
        assert_eq!(parse("ok\nab\"c\n").unwrap_err().line, 2);
        assert_eq!(parse("\"open\n").unwrap_err().line, 1);
        assert!(parse("\"a\"b").is_err());
    }

    #[test]
    fn written_lines_parse_back() {
        let values = ["plain", "with,comma", "with \"quote\"", " padded ", "multi\nline"];
        let text = line(&values);
        assert_eq!(fields(&text), [values.to_vec()]);
    }
}
