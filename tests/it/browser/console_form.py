"""Logs in to the admin console over HTTPS and posts one form, as a non-browser client.

Usage: console_form.py BASE_URL ADMIN PASSWORD PATH FIELD=VALUE...

Prints the answer's status and body. The session cookie and the form's CSRF token come from
the login and the users page, like a browser's would.
"""

import http.cookiejar
import re
import ssl
import sys
import urllib.parse
import urllib.request

base, admin, password, path = sys.argv[1:5]
fields = dict(arg.split("=", 1) for arg in sys.argv[5:])

context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE  # the tests' own CA signed the console's certificate
opener = urllib.request.build_opener(
    urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), urllib.request.HTTPSHandler(context=context)
)


def send(path, data=None):
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with opener.open(base + path, data=body) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


status, _ = send("/login", {"user": admin, "password": password})
assert status == 200, ("login", status)
status, page = send("/users")
csrf = re.search(r'name="csrf" value="([^"]+)"', page)
assert csrf, page[:500]
fields["csrf"] = csrf.group(1)
status, page = send(path, fields)
print(status)
print(page)
