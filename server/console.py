"""``cardcore console``: a read-only back-office web page for store managers and head office.

Why this shape: the console is a *gRPC client* of a running server (the server keeps enforcing
every operator's role and store scope; the console holds no rule of its own), served by the
standard library's ``http.server`` in threads (no new dependency, no JavaScript, no build step).
Charts are SVG drawn here, on the server. The per-store totals come from the chain's reports
(GetReport by store, with the operator's token: the server decides the scope and the business
day).

Secrets: the operator's token lives only in a server-side session keyed by a random HttpOnly,
SameSite=Strict cookie; a card number is POSTed, never put in a URL, and the pages show it
masked (the server answers masked numbers only). The log line of a request is its method, its
path without the query and its status: never a token, a ticket or a card number. No mutating RPC
is ever called.
"""
from __future__ import annotations

import datetime
import html
import http.server
import logging
import re
import secrets
import sys
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

log = logging.getLogger("cardcore.console")

SESSION_IDLE_S = 30 * 60          # a session unused this long is gone (log in again)
SESSION_LIFE_S = 8 * 3600         # and any session after a shift
SESSIONS_MAX = 200                # sessions at once; the oldest goes first
TICKET_LIFE_S = 60                # a one-time sign-in link works this long, once
TICKETS_MAX = 100
CARD_REFS_MAX = 50                # cards a session has looked up and can show again by handle
BODY_MAX_BYTES = 4096             # a form is a token, a card number or a phone: small
LOGIN_FAILURES_PER_MINUTE = 10    # refused sign-ins per client address per sliding minute, then 429
LOGIN_CLIENTS_MAX = 10_000        # client addresses the limit remembers at once
HANDLERS_MAX = 64                 # connections served at once (threads); more are closed
GRPC_TIMEOUT_S = 5.0              # every call to the server, unless --timeout-s (at most 30)
CARD_NEXT_RE = re.compile(r"/card\?ref=[A-Za-z0-9_-]{1,32}(&store=[0-9]{1,10})?")  # a card page
NEXT_PATHS = frozenset(("/", "/card", "/totals", "/terminals", "/health"))  # where a ticket may lead
HISTORY_PAGE = 20                 # the card page's history rows (ListTransactions' first page)
TOTALS_DAYS = 30                  # the long chart: the last 30 business days, today included
TOTALS_CACHE_S = 30.0             # a session's totals serve its pages for this long
STORES_CHART_MAX = 40             # bars per chart; the rest are summed as "others"
METRICS_LINES_MAX = 60            # lines of the server's metrics shown on the health page

COOKIE = "cardcore_console"

CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.6em 1em;display:flex;gap:1.2em;align-items:center}
header a{color:#fff}header form{margin-left:auto}
main{padding:1em 1.5em;max-width:1100px}
table{border-collapse:collapse;background:#fff;margin:.5em 0}
td,th{border:1px solid #ccd;padding:.25em .6em;text-align:left}td.n{text-align:right}
.err{background:#fde;border:1px solid #c88;padding:.5em}.ok{color:#163}.bad{color:#a11}
section{background:#fff;border:1px solid #dde;padding:.6em 1em;margin:.8em 0}
form.inline{display:inline}
"""


def _u(text) -> str:
    """Every value put on a page goes through here."""
    return html.escape(str(text), quote=True)


def yuan(minor: int) -> str:
    sign = "-" if minor < 0 else ""
    return f"{sign}{abs(minor) // 100:,}.{abs(minor) % 100:02d}"


def _when(us: int) -> str:
    if not us:
        return "-"
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


# ---- sessions ---------------------------------------------------------------------------------

@dataclass
class Session:
    token: str                       # the operator token: only here, in memory
    created_s: float
    used_s: float
    cards: dict[str, tuple[str, object]] = field(default_factory=dict)  # handle -> (kind, ref)
    totals: tuple[float, dict] | None = None  # (monotonic time, read_totals' answer)
    chain_admin: bool | None = None  # the server let this token read the chain's report (None: not asked)


class Sessions:
    """Cookie id -> session, with idle and absolute limits, and one-time sign-in tickets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_cookie: dict[str, Session] = {}
        self._tickets: dict[str, tuple[Session, float, str]] = {}
        self._failures: dict[str, list[float]] = {}  # client address -> refused sign-ins

    def _expire(self, now: float) -> None:
        for cid, s in list(self._by_cookie.items()):
            if now - s.used_s > SESSION_IDLE_S or now - s.created_s > SESSION_LIFE_S:
                del self._by_cookie[cid]
        for t, (_, at, _) in list(self._tickets.items()):
            if now - at > TICKET_LIFE_S:
                del self._tickets[t]

    def new(self, token: str, session: Session | None = None) -> str:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while len(self._by_cookie) >= SESSIONS_MAX:
                oldest = min(self._by_cookie, key=lambda c: self._by_cookie[c].used_s)
                del self._by_cookie[oldest]
            cookie = secrets.token_urlsafe(32)
            self._by_cookie[cookie] = session or Session(token, now, now)
            return cookie

    def get(self, cookie: str | None) -> Session | None:
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            s = self._by_cookie.get(cookie or "")
            if s is not None:
                s.used_s = now
            return s

    def drop(self, cookie: str | None) -> None:
        """Logout: this cookie's session and every other cookie of it (tickets' too)."""
        with self._lock:
            s = self._by_cookie.pop(cookie or "", None)
            if s is not None:
                for c in [c for c, v in self._by_cookie.items() if v is s]:
                    del self._by_cookie[c]
                for t in [t for t, v in self._tickets.items() if v[0] is s]:
                    del self._tickets[t]  # its sign-in links die with it

    def ticket(self, session: Session, next_path: str) -> str:
        """A one-time link into this session for another browser (a kiosk, a test's headless
        Chromium): single use, TICKET_LIFE_S, made only by a signed-in POST."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            if len(self._tickets) >= TICKETS_MAX:
                raise OverflowError("too many tickets")
            t = secrets.token_urlsafe(32)
            self._tickets[t] = (session, now, next_path)
            return t

    def redeem(self, ticket: str) -> tuple[str, str] | None:
        with self._lock:
            self._expire(time.monotonic())
            found = self._tickets.pop(ticket, None)
        if found is None:
            return None
        session, _, next_path = found
        with self._lock:
            live = any(v is session for v in self._by_cookie.values())
        if not live:  # signed out (or expired) since the link was made
            return None
        return self.new(session.token, session), next_path

    def login_attempt(self, client: str) -> float | None:
        """Reserve a sign-in attempt of ``client`` (its address) against its own limit, before
        the token is checked (so parallel attempts cannot slip past it): the reservation, or
        None when the client is over LOGIN_FAILURES_PER_MINUTE refused sign-ins a minute."""
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > LOGIN_CLIENTS_MAX:  # forget the quiet ones
                self._failures = {c: v for c, v in self._failures.items() if now - v[-1] < 60}
            recent = [t for t in self._failures.get(client, []) if now - t < 60]
            if len(recent) >= LOGIN_FAILURES_PER_MINUTE:
                self._failures[client] = recent
                return None
            self._failures[client] = recent + [now]
            return now

    def login_succeeded(self, client: str, reservation: float) -> None:
        """A sign-in that was let in does not count against its client."""
        with self._lock:
            mine = self._failures.get(client, [])
            if reservation in mine:
                mine.remove(reservation)


# ---- per-store totals from the chain's reports --------------------------------------------------

@dataclass
class StoreTotals:
    name: str = ""            # the store's name in the chain's registry ("" when not registered)
    purchases: int = 0
    sales_minor: int = 0      # takings: purchases' gross minus discount (what members paid, points too)
    top_ups_minor: int = 0
    refunds: int = 0
    refunds_minor: int = 0    # refunds' amounts
    reversals: int = 0        # reversed operations (not netted out of the figures beside them)


def store_totals(name: str, figures) -> StoreTotals:
    """A report's DayFigures of one store as the page shows them."""
    by_op = {o.operation_type: o for o in figures.operations}

    def of(op_type):
        found = by_op.get(op_type)
        return (found.count, found.amount_minor) if found is not None else (0, 0)

    from cardcore.v1 import common_pb2 as cpb

    purchases, _ = of(cpb.OPERATION_TYPE_PURCHASE)
    _, top_ups_minor = of(cpb.OPERATION_TYPE_TOP_UP)
    refunds, refunds_minor = of(cpb.OPERATION_TYPE_REFUND)
    return StoreTotals(name=name, purchases=purchases,
                       sales_minor=figures.sales_gross_minor - figures.discount_minor,
                       top_ups_minor=top_ups_minor, refunds=refunds, refunds_minor=refunds_minor,
                       reversals=figures.reversals)


def read_totals(backend: Backend, session: Session) -> dict:
    """Today's and the last TOTALS_DAYS business days' figures per store, from GetReport with
    the operator's own token (by_store, last_days: the server decides the scope and the day),
    cached TOTALS_CACHE_S per session. A chain admin's is the chain's report (every store, head
    office's own entries as store 0, and what the chain owes its members); anyone else's, the
    stores in its scope."""
    import grpc

    cached = session.totals
    if cached is not None and time.monotonic() - cached[0] < TOTALS_CACHE_S:
        return cached[1]
    result = None
    if session.chain_admin is not False:
        try:
            result = _totals_of(backend, session.token, chain=True)
            session.chain_admin = True
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.PERMISSION_DENIED:
                raise
            session.chain_admin = False
    if result is None:
        result = _totals_of(backend, session.token, chain=False)
    session.totals = (time.monotonic(), result)
    return result


def _totals_of(backend: Backend, token: str, chain: bool) -> dict:
    from cardcore.v1 import admin_service_pb2 as apb

    answers = {}
    for name, days in (("today", 1), ("month", TOTALS_DAYS)):
        answers[name] = backend.report(token, apb.GetReportRequest(
            chain=chain, by_store=True, last_days=days,
            granularity=apb.REPORT_GRANULARITY_YEAR))
    month, today = answers["month"], answers["today"]
    last = month.rows[-1] if chain and month.rows else None
    return {"today": {s.store_id: store_totals(s.name, s.figures) for s in today.stores},
            "month": {s.store_id: store_totals(s.name, s.figures) for s in month.stores},
            "today_day": today.to_day, "since_day": month.from_day,
            "truncated": today.stores_truncated or month.stores_truncated,
            "liability": (last.liability_principal_minor, last.liability_bonus_minor)
            if last is not None else None}


def bar_chart(title: str, rows: list[tuple[str, int]], css_id: str) -> str:
    """A horizontal SVG bar chart of (label, fen) rows: one <rect class="bar"> per row."""
    width, label_w, bar_h, gap = 760, 120, 22, 6
    height = 30 + len(rows) * (bar_h + gap) + 10
    top = max([v for _, v in rows] + [1])
    parts = [f'<svg id="{_u(css_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" role="img" aria-label="{_u(title)}">',
             f'<text x="0" y="18" font-size="15" font-weight="bold">{_u(title)}</text>']
    for i, (label, value) in enumerate(rows):
        y = 30 + i * (bar_h + gap)
        w = max(0, int((width - label_w - 140) * max(value, 0) / top))
        parts.append(f'<text x="0" y="{y + 16}" font-size="13">{_u(label)}</text>'
                     f'<rect class="bar" x="{label_w}" y="{y}" width="{w}" height="{bar_h}" '
                     f'fill="#3b6ea5"><title>{_u(label)}: {_u(yuan(value))}</title></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 16}" font-size="13">'
                     f'{_u(yuan(value))}</text>')
    if not rows:
        parts.append('<text x="0" y="48" font-size="13">no sales in this period</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---- the gRPC side -----------------------------------------------------------------------------

class Backend:
    """The running server, as the console calls it: read-only calls, each with the session's
    token and a timeout (--timeout-s)."""

    def __init__(self, channel, metrics_url: str | None,
                 timeout_s: float = GRPC_TIMEOUT_S) -> None:
        from grpc_health.v1 import health_pb2_grpc

        from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
        from cardcore.v1 import card_service_pb2_grpc as pb_grpc

        self.channel = channel
        self.cards = pb_grpc.CardServiceStub(channel)
        self.admin = apb_grpc.AdminServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.metrics_url = metrics_url
        self.timeout_s = timeout_s

    @staticmethod
    def _md(token: str):
        return (("authorization", f"Bearer {token}"),)

    def check_token(self, token: str) -> None:
        """Raises grpc.RpcError unless the token is a store manager's or above (ListTerminals
        is the cheapest call the server allows them and refuses cashiers)."""
        from cardcore.v1 import admin_service_pb2 as apb

        self.admin.ListTerminals(apb.ListTerminalsRequest(store_id=0), timeout=self.timeout_s,
                                 metadata=self._md(token))

    def terminals(self, token: str, store_id: int = 0):
        from cardcore.v1 import admin_service_pb2 as apb

        return self.admin.ListTerminals(apb.ListTerminalsRequest(store_id=store_id),
                                        timeout=self.timeout_s, metadata=self._md(token)).terminals

    def report(self, token: str, request):
        return self.admin.GetReport(request, timeout=self.timeout_s, metadata=self._md(token))

    def card(self, token: str, ref: tuple[str, object], store_id: int):
        from cardcore.v1 import card_service_pb2 as pb
        from cardcore.v1 import common_pb2 as cpb

        kind, value = ref
        card_ref = cpb.CardRef(**{kind: value})
        till = cpb.Till(store_id=store_id)
        card = self.cards.GetCard(pb.GetCardRequest(card=card_ref, till=till),
                                  timeout=self.timeout_s, metadata=self._md(token))
        history = self.cards.ListTransactions(
            pb.ListTransactionsRequest(card=card_ref, page_size=HISTORY_PAGE, till=till),
            timeout=self.timeout_s, metadata=self._md(token))
        return card, history

    def find(self, token: str, query: dict, store_id: int):
        from cardcore.v1 import card_service_pb2 as pb
        from cardcore.v1 import common_pb2 as cpb

        return self.cards.FindCards(pb.FindCardsRequest(till=cpb.Till(store_id=store_id), **query),
                                    timeout=self.timeout_s, metadata=self._md(token))

    def serving(self) -> str:
        from grpc_health.v1 import health_pb2

        import grpc

        try:
            answer = self.health.Check(health_pb2.HealthCheckRequest(service=""),
                                       timeout=self.timeout_s)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as err:
            return f"unreachable ({err.code().name})"

    def metrics(self) -> list[str] | str:
        if not self.metrics_url:
            return "not configured (--metrics-url)"
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as r:
                text = r.read(1 << 20).decode("utf-8", "replace")
        except OSError as exc:
            return f"unreachable: {exc.__class__.__name__}"
        lines = [ln for ln in text.splitlines() if ln.startswith("cardcore_")]
        return lines[:METRICS_LINES_MAX]


def rpc_error_text(err) -> str:
    """A refusal as the page shows it: the status and the server's reason (no card number: the
    server never echoes one)."""
    return f"{err.code().name}: {err.details() or ''}"


# ---- the pages ---------------------------------------------------------------------------------

def page(title: str, body: str, signed_in: bool = True) -> str:
    nav = ""
    if signed_in:
        nav = ('<a href="/">Card</a><a href="/totals">Totals</a><a href="/terminals">Terminals</a>'
               '<a href="/health">Health</a><form class="inline" method="post" action="/logout">'
               '<button>Log out</button></form>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_u(title)} - '
            f'cardcore console</title><link rel="stylesheet" href="/console.css"></head><body>'
            f'<header><b>cardcore console</b>{nav}</header><main><h1>{_u(title)}</h1>{body}'
            f'</main></body></html>')


def login_page(error: str = "") -> str:
    err = f'<p class="err">{_u(error)}</p>' if error else ""
    return page("Sign in", err + (
        '<form method="post" action="/login"><p><label>Operator token '
        '<input type="password" name="token" autocomplete="off" size="50" required></label></p>'
        '<p><button>Sign in</button></p></form><p>A store manager\'s token or above; the '
        'console shows what the server lets that operator see, and changes nothing.</p>'),
        signed_in=False)


def lookup_forms(error: str = "") -> str:
    err = f'<p class="err">{_u(error)}</p>' if error else ""
    return err + (
        '<section><h2>By card number</h2><form method="post" action="/card">'
        '<label>Card number <input type="password" name="number" inputmode="numeric" '
        'autocomplete="off" required></label> <label>Till store <input name="store" size="6" '
        'value="0"></label> <button>Look up</button></form></section>'
        '<section><h2>By phone or name</h2><form method="post" action="/find">'
        '<label>Phone <input name="phone" autocomplete="off"></label> <label>or name '
        '<input name="name" autocomplete="off"></label> <label>Till store <input name="store" '
        'size="6" value="0"></label> <button>Find</button></form></section>')


def card_page(card, history, handle: str) -> str:
    from cardcore.v1 import common_pb2 as cpb

    status = cpb.CardStatus.Name(card.status).removeprefix("CARD_STATUS_").lower()
    rows = [("card", card.masked_number), ("status", status),
            ("tier", f"{card.tier} {card.tier_name}"),
            ("available", yuan(card.balance.available_minor)),
            ("principal", yuan(card.balance.principal_minor)),
            ("bonus", yuan(card.balance.bonus_minor)),
            ("held", yuan(card.balance.held_minor)),
            ("points", f"{card.balance.points:,}"),
            ("lifetime paid", yuan(card.lifetime_paid_minor)),
            ("opened (UTC)", _when(card.opened_at_us)),
            ("expires (UTC)", _when(card.expires_at_us) if card.expires_at_us else "never"),
            ("home store", card.profile.home_store_id or "-"),
            ("PIN", "locked" if card.pin_locked else "set" if card.pin_set else "not set")]
    info = "".join(f"<tr><th>{_u(k)}</th><td>{_u(v)}</td></tr>" for k, v in rows)
    hist = ["<tr><th>seq</th><th>when (UTC)</th><th>operation</th><th>amount</th>"
            "<th>principal</th><th>bonus</th><th>points</th><th>store</th></tr>"]
    for e in history.entries:
        hist.append(
            f'<tr><td class="n">{e.seq}</td><td>{_u(_when(e.applied_at_us))}</td><td>'
            f'{_u(cpb.OperationType.Name(e.type).removeprefix("OPERATION_TYPE_").lower())}</td>'
            f'<td class="n">{_u(yuan(e.amount_minor))}</td>'
            f'<td class="n">{_u(yuan(e.principal_delta_minor))}</td>'
            f'<td class="n">{_u(yuan(e.bonus_delta_minor))}</td>'
            f'<td class="n">{e.points_earned - e.points_redeemed:+,}</td>'
            f'<td class="n">{e.till.store_id}</td></tr>')
    more = ("<p>Older entries: <code>cardcore history</code> (this page shows the newest "
            f"{HISTORY_PAGE}).</p>" if history.next_before_seq else "")
    return page(f"Card {card.masked_number}",
                f'<table id="card" data-ref="{_u(handle)}">{info}</table><h2>History</h2>'
                f'<table id="history">{"".join(hist)}</table>{more}')


def found_page(answer, handles: list[str]) -> str:
    from cardcore.v1 import common_pb2 as cpb

    if not answer.cards:
        return page("Find a card", "<p>No card matches.</p>" + lookup_forms())
    rows = ["<tr><th>card</th><th>status</th><th>tier</th><th>opened</th><th>home store</th></tr>"]
    for c, h in zip(answer.cards, handles):
        rows.append(f'<tr><td><a href="/card?ref={_u(h)}">{_u(c.masked_number)}</a></td><td>'
                    f'{_u(cpb.CardStatus.Name(c.status).removeprefix("CARD_STATUS_").lower())}'
                    f'</td><td>{_u(c.tier_name)}</td><td>{_u(_when(c.opened_at_us)[:10])}</td>'
                    f'<td>{_u(c.home_store_id or "-")}</td></tr>')
    more = "<p>More cards match; only the first are shown.</p>" if answer.more else ""
    return page("Cards found", f'<table id="found">{"".join(rows)}</table>{more}')


def _store_label(store: int, t: StoreTotals) -> str:
    return "head office" if store == 0 else f"store {store}" + (f" {t.name}" if t.name else "")


def _chart_rows(per_store: dict) -> list[tuple[str, int]]:
    rows = sorted(((s, t.sales_minor) for s, t in per_store.items() if t.sales_minor),
                  key=lambda r: (-r[1], r[0]))
    out = [(_store_label(s, per_store[s]), v) for s, v in rows[:STORES_CHART_MAX]]
    if len(rows) > STORES_CHART_MAX:
        out.append((f"{len(rows) - STORES_CHART_MAX} others",
                    sum(v for _, v in rows[STORES_CHART_MAX:])))
    return out


def totals_page(totals: dict) -> str:
    def table_of(per_store):
        rows = ["<tr><th>store</th><th>purchases</th><th>takings</th><th>top-ups</th>"
                "<th>refunds</th><th>refunded</th><th>reversals</th></tr>"]
        for s in sorted(per_store):
            t = per_store[s]
            if not (t.purchases or t.top_ups_minor or t.refunds or t.reversals):
                continue  # e.g. head office's admin entries only: nothing a page reader counts
            rows.append(f'<tr><td>{_u(_store_label(s, t))}</td><td class="n">{t.purchases}</td>'
                        f'<td class="n">{_u(yuan(t.sales_minor))}</td><td class="n">'
                        f'{_u(yuan(t.top_ups_minor))}</td><td class="n">{t.refunds}</td>'
                        f'<td class="n">{_u(yuan(t.refunds_minor))}</td>'
                        f'<td class="n">{t.reversals}</td></tr>')
        return f'<table>{"".join(rows)}</table>'

    note = "" if not totals["truncated"] else (
        '<p class="err">Only the first 1,000 stores with entries are shown.</p>')
    owed = totals["liability"]
    if owed is not None:
        note += (f'<p id="liability">Owed to members at the end of today: principal '
                 f'{_u(yuan(owed[0]))}, bonus {_u(yuan(owed[1]))}.</p>')
    return page("Totals per store", note + (
        f'<p>Takings (purchases, gross minus discount, yuan) per store, by business day (the '
        f'card program\'s clock): today is {_u(totals["today_day"])}, the last {TOTALS_DAYS} '
        f'days since {_u(totals["since_day"])}. From the chain\'s reports (the day totals kept '
        'with every operation). Refunds are listed beside, reversals counted, not netted out.</p>'
        f'<section>{bar_chart("Today", _chart_rows(totals["today"]), "chart-today")}'
        f'{table_of(totals["today"])}</section><section>'
        f'{bar_chart(f"Last {TOTALS_DAYS} days", _chart_rows(totals["month"]), "chart-month")}'
        f'{table_of(totals["month"])}</section>'))


def terminals_page(terminals) -> str:
    rows = ["<tr><th>terminal</th><th>store</th><th>state</th><th>enrolled (UTC)</th>"
            "<th>revoked (UTC)</th><th>last KSN counter</th></tr>"]
    for t in terminals:
        state = '<span class="bad">revoked</span>' if t.revoked else '<span class="ok">active</span>'
        rows.append(f'<tr><td class="n">{t.terminal_id}</td><td class="n">{t.store_id}</td>'
                    f'<td>{state}</td><td>{_u(_when(t.enrolled_at_us))}</td><td>'
                    f'{_u(_when(t.revoked_at_us))}</td><td class="n">{t.last_ksn_counter}</td></tr>')
    return page("Terminals", f'<table id="terminals">{"".join(rows)}</table>'
                if terminals else "<p>No terminal in this operator's scope.</p>")


def health_page(serving: str, metrics, target: str) -> str:
    cls = "ok" if serving == "SERVING" else "bad"
    m = (f"<pre>{_u(chr(10).join(metrics))}</pre>" if isinstance(metrics, list)
         else f"<p>{_u(metrics)}</p>")
    return page("Health", f'<p>gRPC server {_u(target)}: <b class="{cls}" id="serving">'
                          f'{_u(serving)}</b></p><h2>Metrics</h2>{m}')


# ---- HTTP --------------------------------------------------------------------------------------

SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class Console:
    """What the handler threads share."""

    def __init__(self, backend: Backend, target: str, https: bool) -> None:
        self.backend, self.target, self.https = backend, target, https
        self.sessions = Sessions()


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 30  # seconds a client may take to send its request (a stalled one frees its thread)
    server_version = "cardcore-console"
    sys_version = ""
    console: Console  # set on the subclass made by make_server

    def log_message(self, fmt, *args) -> None:  # noqa: D401 - the stdlib's hook
        """Never the query (a ticket) nor a body (a token, a card number): method, path,
        status."""

    def log_request(self, code="-", size="-") -> None:
        path = urllib.parse.urlsplit(self.path).path
        log.info("%s %s %s", self.command, path, code)

    # -- helpers
    def _cookie(self) -> str | None:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def _send(self, status: int, body: str, ctype: str = "text/html; charset=utf-8",
              headers: tuple = ()) -> None:
        data = body.encode()
        self.send_response(status)
        for k, v in SECURITY_HEADERS + tuple(headers):
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _redirect(self, where: str, headers: tuple = ()) -> None:
        if not where.startswith("/") or where.startswith("//") or any(
                ord(c) < 33 or c == "\\" for c in where):
            where = "/"  # a path of this console, never a header or a host
        self.send_response(303)
        for k, v in SECURITY_HEADERS + tuple(headers):
            self.send_header(k, v)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _set_cookie(self, cookie: str) -> tuple:
        secure = "; Secure" if self.console.https else ""
        return (("Set-Cookie", f"{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict{secure}"),)

    def _form(self) -> dict[str, str] | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(400, page("Bad request", "<p>No readable Content-Length.</p>", False))
            return None
        if length > BODY_MAX_BYTES:
            self._send(413, page("Too large", "<p>A form is at most 4 KiB.</p>", False))
            return None
        raw = self.rfile.read(length).decode("utf-8", "replace")
        try:
            return {k: v[0] for k, v in urllib.parse.parse_qs(raw, max_num_fields=10).items()}
        except ValueError:  # more fields than any form has
            self._send(400, page("Bad request", "<p>Too many fields.</p>", False))
            return None

    def _same_origin(self) -> bool:
        """Whether a POST comes from this console's own pages: a browser's Sec-Fetch-Site says
        so, and an Origin, when sent, must be this console's (SameSite=Strict alone lets a page
        of another port of the same host, and a sign-in needs no cookie at all)."""
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return False
        origin = self.headers.get("Origin")
        if origin is None or origin == "null" and fetch_site is None:
            return True  # not a browser's cross-site form (curl, a test client)
        scheme = "https" if self.console.https else "http"
        return origin == f"{scheme}://{self.headers.get('Host', '')}"

    def _session(self) -> Session | None:
        s = self.console.sessions.get(self._cookie())
        if s is None:
            self._redirect("/login")
        return s

    # -- routes
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(url.query, max_num_fields=5)
        except ValueError:
            return self._send(400, page("Bad request", "<p>Too many fields.</p>", False))
        if url.path == "/console.css":
            return self._send(200, CSS, "text/css; charset=utf-8")
        if url.path == "/login":
            return self._send(200, login_page())
        if url.path == "/enter":
            got = self.console.sessions.redeem((query.get("ticket") or [""])[0])
            if got is None:
                return self._send(403, login_page("That sign-in link is used or expired."))
            cookie, next_path = got
            return self._redirect(next_path, self._set_cookie(cookie))
        s = self._session()
        if s is None:
            return None
        return self._signed_in_get(s, url.path, query)

    def _signed_in_get(self, s: Session, path: str, query: dict) -> None:
        import grpc

        b = self.console.backend
        try:
            if path == "/":
                return self._send(200, page("Find a card", lookup_forms()))
            if path == "/card":
                handle = (query.get("ref") or [""])[0]
                ref = s.cards.get(handle)
                if ref is None:
                    return self._send(404, page("Find a card", lookup_forms(
                        "That card is no longer in this session: look it up again.")))
                store_text = (query.get("store") or ["0"])[0]
                store = (int(store_text) if store_text.isascii() and store_text.isdigit()
                         and len(store_text) < 10 else 0)
                card, history = b.card(s.token, ref, store)
                return self._send(200, card_page(card, history, handle))
            if path == "/terminals":
                return self._send(200, terminals_page(b.terminals(s.token)))
            if path == "/health":
                status = 200
                try:
                    b.terminals(s.token)  # the token still counts (a removed operator: signed out)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    # the server down: what this page is opened for (its session stands: a
                    # token is checked again once the server answers)
                    status = 503
                return self._send(status, health_page(b.serving(), b.metrics(),
                                                      self.console.target))
            if path == "/totals":
                b.terminals(s.token)  # the token still counts (a removed operator: signed out)
                return self._send(200, totals_page(read_totals(b, s)))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.console.sessions.drop(self._cookie())
                return self._send(401, login_page("The server no longer accepts this token."))
            return self._send(502 if err.code() == grpc.StatusCode.UNAVAILABLE else 403,
                              page("Refused", f'<p class="err">{_u(rpc_error_text(err))}</p>'))
        return self._send(404, page("Not found", "<p>No such page.</p>"))

    def do_POST(self) -> None:  # noqa: N802
        import grpc

        path = urllib.parse.urlsplit(self.path).path
        if not self._same_origin():  # a form posted from another page, sign-in included
            return self._send(403, page("Refused", "<p>A form from another site.</p>", False))
        form = self._form()
        if form is None:
            return None
        sessions = self.console.sessions
        if path == "/login":
            client = self.client_address[0]
            reservation = sessions.login_attempt(client)
            if reservation is None:
                return self._send(429, login_page("Too many refused sign-ins: wait a minute."))
            token = form.get("token", "").strip()
            if not token or len(token) > 200:
                return self._send(401, login_page("That token is refused."))
            try:
                self.console.backend.check_token(token)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:
                    return self._send(403, login_page("The console is for store managers and "
                                                      "above: this operator may not use it."))
                if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return self._send(401, login_page("That token is refused."))
                return self._send(502, login_page(f"The server: {rpc_error_text(err)}"))
            sessions.login_succeeded(client, reservation)
            return self._redirect("/", self._set_cookie(sessions.new(token)))
        if path == "/logout":
            sessions.drop(self._cookie())
            cleared = f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
            return self._redirect("/login", (("Set-Cookie", cleared),))
        s = self._session()
        if s is None:
            return None
        store_text = form.get("store", "0").strip() or "0"
        if not (store_text.isascii() and store_text.isdigit()) or int(store_text) >= 1 << 32:
            return self._send(400, page("Find a card", lookup_forms("The store is a number.")))
        store = int(store_text)
        if path == "/card":
            number = "".join(form.get("number", "").split())
            if not (number.isascii() and number.isdigit()) or not 8 <= len(number) <= 19:
                return self._send(400, page("Find a card", lookup_forms(
                    "A card number is 8 to 19 digits.")))
            handle = self._remember(s, ("card_number", number))
            return self._redirect(f"/card?ref={handle}&store={store}")
        if path == "/find":
            phone, name = form.get("phone", "").strip(), form.get("name", "").strip()
            if bool(phone) == bool(name) or len(phone) > 20 or len(name) > 64:
                return self._send(400, page("Find a card", lookup_forms(
                    "Give a phone (at most 20 characters) or a name (at most 64), not both.")))
            try:
                answer = self.console.backend.find(
                    s.token, {"phone": phone} if phone else {"name": name}, store)
            except grpc.RpcError as err:
                return self._send(403, page("Refused", f'<p class="err">'
                                                       f'{_u(rpc_error_text(err))}</p>'))
            handles = [self._remember(s, ("card_id", c.card_id)) for c in answer.cards]
            return self._send(200, found_page(answer, handles))
        if path == "/ticket":
            next_path = form.get("next", "/")
            if next_path not in NEXT_PATHS and not CARD_NEXT_RE.fullmatch(next_path):
                next_path = "/"  # this console's pages only: no redirect elsewhere, no header
                #                  injection through a crafted path
            try:
                ticket = sessions.ticket(s, next_path)
            except OverflowError:
                return self._send(429, page("Busy", "<p>Too many sign-in links: wait a minute.</p>"))
            return self._send(200, f"/enter?ticket={ticket}", "text/plain; charset=utf-8")
        return self._send(404, page("Not found", "<p>No such page.</p>"))

    @staticmethod
    def _remember(s: Session, ref: tuple[str, object]) -> str:
        """A random handle for a card the session looked up: the URL carries it, never the
        number."""
        for h, r in s.cards.items():
            if r == ref:
                return h
        while len(s.cards) >= CARD_REFS_MAX:
            s.cards.pop(next(iter(s.cards)))
        h = secrets.token_urlsafe(12)
        s.cards[h] = ref
        return h


class _Server(http.server.ThreadingHTTPServer):
    """One thread per connection, at most HANDLERS_MAX at once (more are closed at once, never
    queued); over HTTPS the TLS handshake runs in the connection's own thread, with the
    handler's timeout, so one silent client holds one slot, not the listener."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.slots = threading.BoundedSemaphore(HANDLERS_MAX)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            if self.tls is not None:
                request.settimeout(Handler.timeout)
                try:
                    request = self.tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError):
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(listen: tuple[str, int], console: Console,
                https: tuple[str, str] | None) -> http.server.ThreadingHTTPServer:
    handler = type("ConsoleHandler", (Handler,), {"console": console})
    httpd = _Server(listen, handler)
    if https:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(*https)
        httpd.tls = ctx
    return httpd


def cmd_console(args) -> int:
    """Serve the console until interrupted."""

    from .cmd_client import _channel, _loopback
    from .text import UsageError

    host, _, port_text = args.listen.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    https = None
    if args.http_cert or args.http_key:
        if not (args.http_cert and args.http_key):
            raise UsageError("--http-cert and --http-key go together")
        https = (args.http_cert, args.http_key)
    if https is None and not _loopback(f"{host}:{port}"):
        raise UsageError(f"the console listens on {host} only over HTTPS (--http-cert, "
                         "--http-key): operator tokens are typed into it; plain HTTP on "
                         "loopback only")
    if not args.tls_ca and not _loopback(args.target):
        raise UsageError(f"operator tokens go to {args.target} only over TLS: give --tls-ca, "
                         "--tls-cert and --tls-key")
    if args.data_dir:
        print("cardcore console: --data-dir is no longer needed (the totals come from the "
              "server's reports) and is ignored", file=sys.stderr)
    backend = Backend(_channel(args), args.metrics_url, min(args.timeout_s, 30.0))
    console = Console(backend, args.target, https is not None)
    httpd = make_server((host, port), console, https)
    scheme = "https" if https else "http"
    bound_host, bound_port = httpd.server_address[:2]
    print(f"cardcore console on {scheme}://{bound_host}:{bound_port}/", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()
    return 0
