"""Drives the admin console in headless Chromium (Selenium + chromedriver), as an admin would.

Usage: console.py BASE_URL ADMIN PASSWORD NON_ADMIN PASSWORD NEW_ADDRESS SCREENSHOT_DIR PROFILES_FILE

Logs in as the admin, edits the profile "office" to allow NEW_ADDRESS, checks the diff
preview, saves, visits every page (a screenshot of each), then checks that a form post
without or with a wrong CSRF token is refused, and that a directory user outside the admin
groups cannot log in. Prints one line per step; exits non-zero on the first failure.
"""

import http.cookiejar
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

base, admin, admin_pw, other, other_pw, new_address, shots, profiles_file = sys.argv[1:9]


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--user-data-dir=" + tempfile.mkdtemp(prefix="postern-chromium-")]:
        options.add_argument(flag)
    # The console's certificate comes from the tests' own CA, which the browser does not know.
    options.set_capability("acceptInsecureCerts", True)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    # A click that submits a form returns before the next page is there: lookups wait for it.
    driver.implicitly_wait(10)
    return driver


def wait_for_url(driver, ending):
    WebDriverWait(driver, 10).until(expected_conditions.url_matches(ending + "$"))


def shot(driver, name):
    driver.save_screenshot(os.path.join(shots, name + ".png"))
    print("screenshot", name)


def log_in(driver, user, password):
    driver.get(base + "/login")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()


def post(path, fields, cookie):
    """A form post from outside the browser, with the admin's session cookie."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    data = urllib.parse.urlencode(fields).encode()
    request = urllib.request.Request(base + path, data=data, method="POST")
    request.add_header("Cookie", "__Host-postern-console=" + cookie)
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


driver = browser()
try:
    driver.get(base + "/profiles")
    assert driver.current_url.endswith("/login"), "not logged in: sent to the login page"
    shot(driver, "login")

    log_in(driver, admin, admin_pw)
    wait_for_url(driver, "/profiles")
    assert "office" in driver.find_element(By.ID, "profiles").text
    shot(driver, "profiles")
    print("admin logged in")

    driver.find_element(By.ID, "edit-office").click()
    allow = driver.find_element(By.ID, "allow")
    allow.send_keys("\n" + new_address)
    shot(driver, "profile-edit")
    driver.find_element(By.ID, "preview").click()
    assert driver.find_elements(By.ID, "diff"), driver.find_element(By.TAG_NAME, "main").text
    diff = driver.find_element(By.ID, "diff").text
    assert '"' + new_address + '"' in diff and "+" in diff, diff
    shot(driver, "profile-preview")
    print("diff shows the new address")
    driver.find_element(By.ID, "save").click()
    message = driver.find_element(By.ID, "message").text
    assert message.startswith("Saved"), message
    print("saved")

    # A broken entry is refused with the parser's error shown, and nothing is written.
    driver.get(base + "/profiles/edit?name=office")
    driver.find_element(By.ID, "allow").send_keys("\nnot-an-address")
    driver.find_element(By.ID, "preview").click()
    error = driver.find_element(By.ID, "error").text
    assert "not-an-address" in error, error
    shot(driver, "profile-error")
    print("broken profile refused:", error)

    # An edit saved from a preview made before someone else changed the file is refused.
    driver.get(base + "/profiles/edit?name=office")
    driver.find_element(By.ID, "users").send_keys("\nlate@example.com")
    driver.find_element(By.ID, "preview").click()
    assert driver.find_elements(By.ID, "diff")
    with open(profiles_file, "a") as f:
        f.write("# edited by hand meanwhile\n")
    driver.find_element(By.ID, "save").click()
    message = driver.find_element(By.ID, "message").text
    assert "changed since the preview" in message, message
    with open(profiles_file) as f:
        assert "late@example.com" not in f.read(), "nothing was written"
    print("stale save refused")

    for page in ["users", "sessions", "history"]:
        driver.get(base + "/" + page)
        assert driver.find_element(By.ID, page), page
        shot(driver, page)

    driver.get(base + "/explain?" + urllib.parse.urlencode({"user": other, "ip": new_address, "protocol": "imap"}))
    explanation = driver.find_element(By.ID, "explanation").text
    assert "allowed by profile \"office\"" in explanation and "route: default" in explanation, explanation
    shot(driver, "explain")
    print("explained")

    driver.get(base + "/users")
    row = [r for r in driver.find_elements(By.CSS_SELECTOR, "#users tr") if other in r.text][0]
    row.find_element(By.NAME, "label").send_keys("phone")
    row.find_element(By.CSS_SELECTOR, "button[value=app_add]").click()
    secret = driver.find_element(By.ID, "secret").text
    assert len(secret.replace("-", "")) >= 16, secret
    shot(driver, "app-password")
    driver.get(base + "/users")
    assert "phone (never used)" in driver.find_element(By.ID, "users").text
    print("app password added")

    driver.get(base + "/users")
    driver.find_element(By.ID, "import-csv").send_keys("user,password\nimported@example.com,pw-imported\nnot a user,pw\n")
    driver.find_element(By.ID, "import").click()
    message = driver.find_element(By.ID, "message").text
    assert "nothing was written" in message, message
    driver.get(base + "/users")
    driver.find_element(By.ID, "import-csv").send_keys("user,password\nimported@example.com,pw-imported\n")
    driver.find_element(By.ID, "import").click()
    assert driver.find_element(By.ID, "message").text.startswith("Imported 1 row"), driver.find_element(By.ID, "message").text
    driver.get(base + "/users")
    assert "imported@example.com" in driver.find_element(By.ID, "users").text
    print("imported")

    row = [r for r in driver.find_elements(By.CSS_SELECTOR, "#users tr") if other in r.text][0]
    row.find_element(By.CSS_SELECTOR, "button[value=reveal]").click()
    print("revealed", len(driver.find_element(By.ID, "secret").text), "characters")

    cookie = driver.get_cookie("__Host-postern-console")
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie.get("sameSite") == "Strict", cookie
    status, body = post("/profiles/save", {"new_text": "", "base": "", "name": "office"}, cookie["value"])
    assert status == 403 and "security token" in body, (status, body[:200])
    status, body = post("/sessions/close", {"id": "1", "csrf": "forged"}, cookie["value"])
    assert status == 403, status
    print("posts without the CSRF token refused")

    driver.delete_all_cookies()
    log_in(driver, other, other_pw)
    assert "You are not allowed to access this server" in driver.find_element(By.ID, "message").text
    driver.get(base + "/users")
    wait_for_url(driver, "/login")
    print("non-admin refused")
finally:
    driver.quit()
print("OK")
