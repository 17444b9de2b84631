"""The back-office console (``cardcore console``) over a real server (its totals from the
chain's reports), real HTTP, and a real headless Chromium when Debian's chromium is installed."""
from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import Admin, Client

CONSOLE_RE = re.compile(rb"cardcore console on (http://[\d.]+:\d+)/")
ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "test-artifacts")


class ConsoleProcess:
    def __init__(self, target: str, log_path: str):
        self._log = open(log_path, "ab")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cardcore.server.cli", "console", "--listen", "127.0.0.1:0",
             "--target", target],
            stdout=subprocess.PIPE, stderr=self._log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            m = CONSOLE_RE.search(line)
            if m:
                self.url = m.group(1).decode()
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(open(log_path).read()[-2000:])
        self.proc.kill()
        raise RuntimeError("console did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


class Browser:
    """A person's browser as urllib: cookies kept, redirects followed."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str):
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, **form):
        data = urllib.parse.urlencode(form).encode()
        return self._open(urllib.request.Request(self.base + path, data=data))

    def _open(self, req):
        try:
            r = self.opener.open(req, timeout=30)
            return r.status, r.read().decode(), r
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), err


@pytest.fixture
def seeded(server, tmp_path):
    """A server with sales at stores 1 and 2 today, and a console beside its data folder."""
    client = Client(server.stub)
    number = client.funded_card(100_000)
    client.purchase(number, 12_000, store_id=1)
    client.purchase(number, 3_000, store_id=2)
    client.purchase(number, 1_000, store_id=2)
    console = ConsoleProcess(server.target, str(tmp_path / "console.log"))
    yield server, console, number
    console.stop()


def signed_in(console, token) -> Browser:
    b = Browser(console.url)
    status, body, _ = b.post("/login", token=token)
    assert status == 200 and "Find a card" in body
    return b


def test_a_bad_token_is_refused_and_pages_need_a_session(seeded):
    server, console, _ = seeded
    b = Browser(console.url)
    status, body, _ = b.post("/login", token="cc_not-a-token")
    assert status == 401 and "refused" in body
    assert not list(b.jar)                       # no session cookie given
    status, body, r = b.get("/terminals")
    assert r.geturl().endswith("/login") and "Operator token" in body


def test_the_card_page_shows_the_masked_number_and_never_the_full_one(seeded):
    server, console, number = seeded
    b = signed_in(console, server.admin_token)
    status, body, r = b.post("/card", number=number, store="0")
    assert status == 200, body
    masked = number[:6] + "*" * (len(number) - 10) + number[-4:]
    assert masked in body
    assert number not in body and number not in r.geturl()
    assert "840.00" in body                      # 1,000.00 topped up, 160.00 paid (tier 0: 100%)
    assert body.count("<tr><td class=\"n\">") >= 4  # open, top-up and three purchases
    assert number not in console.log() and server.admin_token not in console.log()


def test_the_totals_chart_has_a_bar_per_store(seeded):
    server, console, _ = seeded
    b = signed_in(console, server.admin_token)
    status, body, _ = b.get("/totals")
    assert status == 200
    today = re.search(r'<svg id="chart-today".*?</svg>', body, re.S).group(0)
    assert today.count('class="bar"') == 2       # stores 1 and 2
    assert "store 1: 120.00" in today and "store 2: 40.00" in today
    assert 'id="chart-month"' in body


def test_security_headers_and_cookie_flags(seeded):
    server, console, _ = seeded
    b = Browser(console.url)
    _, _, r = b.get("/login")
    assert r.headers["X-Frame-Options"] == "DENY"
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "script-src" not in r.headers["Content-Security-Policy"]  # no script at all
    req = urllib.request.Request(console.url + "/login", data=urllib.parse.urlencode(
        {"token": server.admin_token}).encode())

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    try:
        urllib.request.build_opener(NoRedirect).open(req, timeout=30)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as err:
        assert err.code == 303
        cookie = err.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_logout_ends_the_session_and_a_ticket_works_once(seeded):
    server, console, _ = seeded
    b = signed_in(console, server.admin_token)
    status, link, _ = b.post("/ticket", next="/terminals")
    assert status == 200 and link.startswith("/enter?ticket=")
    other = Browser(console.url)
    status, body, _ = other.get(link)
    assert status == 200 and "Terminals" in body
    status, body, _ = Browser(console.url).get(link)
    assert status == 403                           # used once already
    b.post("/logout")
    _, body, r = other.get("/terminals")            # the ticket's cookie is the same session
    assert r.geturl().endswith("/login")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed "
                                                "(.ci/run installs it: apt-get install chromium)")
def test_in_a_real_browser_a_card_and_a_chart(seeded, tmp_path):
    """Log in over HTTP, look a card up, then hand the session to headless Chromium through a
    one-time sign-in link; Chromium renders the card page (screenshot kept in test-artifacts/)
    and the totals page with its SVG."""
    server, console, number = seeded
    b = signed_in(console, server.admin_token)
    _, _, r = b.post("/card", number=number, store="0")
    card_path = urllib.parse.urlsplit(r.geturl())
    card_path = card_path.path + "?" + card_path.query
    masked = number[:6] + "*" * (len(number) - 10) + number[-4:]

    def chromium(next_path: str, *what: str) -> str:
        _, link, _ = b.post("/ticket", next=next_path)
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
               "--window-size=1280,900", *what, console.url + link]
        out = subprocess.run(cmd, capture_output=True, timeout=120)
        return out.stdout.decode("utf-8", "replace")

    dom = chromium(card_path, "--dump-dom")
    assert masked in dom and number not in dom
    dom = chromium("/totals", "--dump-dom")
    assert "<svg" in dom and dom.count('class="bar"') >= 2
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "console.png")
    if os.path.exists(shot):
        os.remove(shot)
    chromium("/totals", f"--screenshot={shot}")
    assert os.path.getsize(shot) > 5000
    card_shot = os.path.join(ARTIFACTS, "console-card.png")
    chromium(card_path, f"--screenshot={card_shot}")
    assert os.path.exists(card_shot)


def test_a_store_manager_sees_only_its_store_and_a_cashier_is_refused(seeded):
    from cardcore.v1 import common_pb2 as cpb

    server, console, number = seeded
    admin = Admin(server.channel, server.admin_token)
    manager = admin.add_operator("mgr2", cpb.OPERATOR_ROLE_STORE_MANAGER, [2])
    cashier = admin.add_operator("cash2", cpb.OPERATOR_ROLE_CASHIER, [2])
    status, body, _ = Browser(console.url).post("/login", token=cashier)
    assert status == 403 and "store managers and above" in body
    b = signed_in(console, manager)
    _, body, _ = b.get("/totals")
    today = re.search(r'<svg id="chart-today".*?</svg>', body, re.S).group(0)
    assert today.count('class="bar"') == 1 and "store 2: 40.00" in today
    assert "store 1" not in body
    _, body, _ = b.get("/terminals")
    assert "No terminal" in body


def test_find_by_phone_then_the_card_by_its_handle(seeded):
    server, console, _ = seeded
    client = Client(server.stub)
    from conftest import new_card_number

    number = new_card_number()
    client.open(number, phone="+86 138 0013 8000")
    b = signed_in(console, server.admin_token)
    status, body, _ = b.post("/find", phone="13800138000", store="0")
    assert status == 200
    masked = number[:6] + "*" * (len(number) - 10) + number[-4:]
    assert masked in body and number not in body and "13800138000" not in body
    link = re.search(r'href="(/card\?ref=[^"]+)"', body).group(1)
    status, body, _ = b.get(html_unescape(link))
    assert status == 200 and f"Card {masked}" in body, body[-600:]
    assert "open_card" in body  # its history, by its card id (ListTransactions takes one)
    status, body, _ = b.post("/find", phone="1", name="x")
    assert status == 400


def test_bad_input_is_refused_plainly(seeded):
    server, console, _ = seeded
    b = signed_in(console, server.admin_token)
    status, body, _ = b.post("/card", number="12ab", store="0")
    assert status == 400 and "8 to 19 digits" in body
    status, body, _ = b.post("/card", number="4" * 16, store="x")
    assert status == 400 and "The store is a number" in body
    status, body, _ = b.get("/card?ref=nothing")
    assert status == 404
    status, body, _ = b.post("/login", token="x" * 5000)
    assert status == 413


def test_the_health_page_says_serving(seeded):
    server, console, _ = seeded
    b = signed_in(console, server.admin_token)
    status, body, _ = b.get("/health")
    assert status == 200 and '<b class="ok" id="serving">SERVING</b>' in body


def test_the_health_page_says_so_when_the_server_is_down(start_server, tmp_path):
    """The page IT opens when the tills fail: with the gRPC server stopped it still answers
    (503), the server shown unreachable, not a refusal; the session stands."""
    server = start_server()
    console = ConsoleProcess(server.target, str(tmp_path / "console.log"))
    try:
        b = signed_in(console, server.admin_token)
        assert b.get("/health")[0] == 200
        server.stop()
        status, body, _ = b.get("/health")
        assert status == 503 and '<b class="bad" id="serving">unreachable (UNAVAILABLE)</b>' in body
        assert "Refused" not in body
    finally:
        console.stop()


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def test_the_totals_come_from_the_chains_reports_by_business_day(seeded):
    """The totals page reads GetReport (by store, the last days) with the operator's token: a
    refund is listed at its store beside its sales, a registered store shows its name, the
    chain admin sees what the chain owes its members as the report has it, and the business
    day shown is the report's."""
    from cardcore.v1 import admin_service_pb2 as apb
    from cardcore.v1 import card_service_pb2 as pb
    from cardcore.v1 import common_pb2 as cpb
    from conftest import bearer, rid, sent_at

    server, console, number = seeded
    history = server.stub.ListTransactions(pb.ListTransactionsRequest(
        card=cpb.CardRef(card_number=number)), metadata=bearer(server.admin_token))
    sale = next(e for e in history.entries if e.type == cpb.OPERATION_TYPE_PURCHASE
                and e.amount_minor == 12_000)
    request_id = rid()
    server.stub.Refund(pb.RefundRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), original_seq=sale.seq, amount_minor=2_000,
        till=cpb.Till(store_id=1)), metadata=bearer(server.admin_token))
    request_id = rid()
    admin = Admin(server.channel, server.admin_token).stub
    admin.PutStore(apb.PutStoreRequest(
        request_id=request_id, client_time_us=sent_at(request_id), store_id=2,
        name="Harbin Central"), metadata=bearer(server.admin_token))
    chain = admin.GetReport(apb.GetReportRequest(chain=True, last_days=1),
                                   metadata=bearer(server.admin_token))
    b = signed_in(console, server.admin_token)
    _, body, _ = b.get("/totals")
    today = re.search(r'<section>.*?</section>', body, re.S).group(0)
    row = re.search(r"<tr><td>store 1</td>(.*?)</tr>", today).group(1)
    assert re.findall(r'class="n">([^<]*)<', row) == ["1", "120.00", "1,000.00", "1", "20.00", "0"]
    assert "store 2 Harbin Central: 40.00" in today
    owed = re.search(r'<p id="liability">(.*?)</p>', body).group(1)
    assert f"principal {chain.rows[-1].liability_principal_minor / 100:,.2f}" in owed
    assert f"today is {chain.to_day}" in body
    assert "<td>head office</td>" not in body  # its admin entries only (the put): no row
    # a sale at head office (store 0) is the chain admin's to see, as "head office" (before the
    # reports, the console never showed store 0)
    Client(server.stub).purchase(number, 500, store_id=0)
    _, body, _ = signed_in(console, server.admin_token).get("/totals")  # a new session: no cache
    row = re.search(r"<tr><td>head office</td>(.*?)</tr>", body).group(1)
    assert re.findall(r'class="n">([^<]*)<', row)[:2] == ["1", "5.00"]
    # a store manager's page has no liability line (not the chain's report)
    manager = Admin(server.channel, server.admin_token).add_operator(
        "mgr1", cpb.OPERATOR_ROLE_STORE_MANAGER, [1])
    _, body, _ = signed_in(console, manager).get("/totals")
    assert 'id="liability"' not in body and "<td>store 1</td>" in body
    assert "Harbin Central" not in body


def test_plain_http_off_loopback_is_a_usage_error():
    def run(*args):
        out = subprocess.run([sys.executable, "-m", "cardcore.server.cli", "console", *args],
                             capture_output=True, text=True, timeout=60)
        return out.returncode, out.stderr

    code, err = run("--listen", "0.0.0.0:0")
    assert code == 2 and "only over HTTPS" in err
    code, err = run("--listen", "127.0.0.1:0", "--target", "10.1.2.3:50051")
    assert code == 2 and "only over TLS" in err


def test_over_https_the_cookie_is_secure(server, tmp_path):
    import ssl

    from cardcore.server import certs

    ca_dir = str(tmp_path / "web-ca")
    certs.make_ca(ca_dir)
    cert, key = certs.make_server_cert(ca_dir, ["127.0.0.1"])
    log = open(tmp_path / "console.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardcore.server.cli", "console", "--listen", "127.0.0.1:0",
         "--target", server.target, "--http-cert", cert, "--http-key", key],
        stdout=subprocess.PIPE, stderr=log)
    try:
        line = proc.stdout.readline()
        url = re.search(rb"(https://[\d.]+:\d+)/", line).group(1).decode()
        ctx = ssl.create_default_context(cafile=os.path.join(ca_dir, "ca.pem"))

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
        req = urllib.request.Request(url + "/login", data=urllib.parse.urlencode(
            {"token": server.admin_token}).encode())
        import socket

        host, port = url.removeprefix("https://").split(":")
        idle = socket.create_connection((host, int(port)))  # a client that never says hello
        try:
            try:
                opener.open(req, timeout=10)  # still served: the handshake is not the listener's
                raise AssertionError("no redirect")
            except urllib.error.HTTPError as err:
                assert err.code == 303
                assert "; Secure" in err.headers["Set-Cookie"]
        finally:
            idle.close()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_the_health_page_shows_the_servers_metrics(start_server, tmp_path):
    server = start_server("--metrics-listen", "127.0.0.1:0")
    deadline = time.monotonic() + 10
    while not (m := re.search(r"metrics on (http://\S+/metrics)", server.log())):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    Client(server.stub).funded_card(5_000)
    log = open(tmp_path / "console.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardcore.server.cli", "console", "--listen", "127.0.0.1:0",
         "--target", server.target, "--metrics-url", m.group(1)],
        stdout=subprocess.PIPE, stderr=log)
    try:
        url = CONSOLE_RE.search(proc.stdout.readline()).group(1).decode()
        b = Browser(url)
        assert b.post("/login", token=server.admin_token)[0] == 200
        status, body, _ = b.get("/health")
        assert status == 200 and "SERVING" in body
        assert "cardcore_operations_total" in body
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_forms_from_elsewhere_crafted_links_and_input_are_refused(seeded):
    """A POST whose Origin (or Sec-Fetch-Site) is another site is refused, sign-in included; a
    ticket's destination is one of the console's pages (a crafted one, with a header or another
    host in it, lands on /); signing out kills the session's unused tickets; odd digits and too
    many fields are a 400, not a dropped connection."""
    server, console, number = seeded
    req = urllib.request.Request(console.url + "/login", data=urllib.parse.urlencode(
        {"token": server.admin_token}).encode(), headers={"Origin": "http://evil.example"})
    status, _, _ = Browser(console.url)._open(req)
    assert status == 403
    b = signed_in(console, server.admin_token)
    for crafted in ("/%0d%0aSet-Cookie:%20x=1", "/\\evil.example", "//evil.example", "/\t/x"):
        _, link, _ = b.post("/ticket", next=urllib.parse.unquote(crafted))
        other = Browser(console.url)
        status, _, r = other.get(link)
        assert status == 200 and urllib.parse.urlsplit(r.geturl()).path == "/"
        assert not any(c.name == "x" for c in other.jar)
    _, link, _ = b.post("/ticket", next="/terminals")
    b.post("/logout")
    status, _, _ = Browser(console.url).get(link)
    assert status == 403
    b = signed_in(console, server.admin_token)
    status, _, _ = b.post("/card", number=number, store="\u00b2")
    assert status == 400
    status, _, _ = b.get("/?a&b&c&d&e&f&g")
    assert status == 400
