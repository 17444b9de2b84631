"""The load kit's plain parts, shared by bench/load.py and bench/locustfile.py: the operation mix,
the load shapes' schedules, the terminals' certificate files.

Nothing here imports locust: importing locust monkey-patches the whole process with gevent, and
the tests (and load.py) read these without it. The locustfile wraps the schedules in locust's
``LoadTestShape``.
"""
from __future__ import annotations

import json
import math
import os
import re

# ---- the operation mix ---------------------------------------------------------------------

# Mix names -> the locust task (PosTerminal method) and the name its requests are reported under.
OPERATIONS = {"purchase": ("purchase", "purchase"),
              "inquiry": ("balance_inquiry", "balance inquiry"),
              "top_up": ("top_up", "top-up"),
              "wrong_pin": ("purchase_wrong_pin", "purchase (wrong PIN)")}
DEFAULT_MIX = {"purchase": 70, "inquiry": 15, "top_up": 10, "wrong_pin": 3}
WEIGHT_MAX = 1000  # locust expands weights into a task list: bounded, and 0.1 % is fine enough


class MixError(ValueError):
    """A mix that cannot be used; the text is one line for the command line."""


def check_mix(mix: dict) -> dict[str, int]:
    """Whole weights 0..WEIGHT_MAX for known names, at least one above 0. Names left out weigh 0."""
    if not isinstance(mix, dict) or not mix:
        raise MixError("the mix is empty: give name=weight pairs, e.g. purchase=70,inquiry=15")
    out = {}
    for name, weight in mix.items():
        if name not in OPERATIONS:
            raise MixError(f"unknown operation {name!r} in the mix (known: {', '.join(OPERATIONS)})")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise MixError(f"the weight of {name} must be a whole number, not {weight!r}")
        if not 0 <= weight <= WEIGHT_MAX:
            raise MixError(f"the weight of {name} must be 0..{WEIGHT_MAX}, not {weight}")
        out[name] = weight
    if not any(out.values()):
        raise MixError("every weight in the mix is 0: nothing would run")
    return out


def parse_mix(text: str) -> dict[str, int]:
    """``purchase=70,inquiry=15`` -> {"purchase": 70, "inquiry": 15}, checked."""
    mix: dict = {}
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        if not sep or not name.strip():
            raise MixError(f"not name=weight: {part.strip()!r} (e.g. purchase=70,inquiry=15)")
        name = name.strip()
        if name in mix:
            raise MixError(f"{name} is named twice in the mix")
        try:
            mix[name] = int(weight.strip())
        except ValueError:
            raise MixError(f"the weight of {name} must be a whole number, not {weight.strip()!r}") from None
    return check_mix(mix)


def read_mix_file(path: str) -> dict[str, int]:
    """A JSON object or a TOML table of name = weight (a ``[mix]`` table, or top-level keys)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise MixError(f"cannot read the mix file {path}: {exc.strerror or exc}") from None
    try:
        if path.endswith(".toml"):
            import tomllib  # only for a TOML mix file

            doc = tomllib.loads(data.decode("utf-8"))
        else:
            doc = json.loads(data)
    except ValueError as exc:
        raise MixError(f"the mix file {path} does not parse: {str(exc).splitlines()[0]}") from None
    if isinstance(doc, dict) and isinstance(doc.get("mix"), dict):
        doc = doc["mix"]
    return check_mix(doc)


# ---- load shapes -----------------------------------------------------------------------------
# Each schedule's tick(t) says (users, spawn rate) at t seconds into the run, or None to stop;
# locust's LoadTestShape calls tick() once a second (the locustfile passes get_run_time()).

class LunchRush:
    """A chain's lunch rush: quiet users, a ramp up to the peak, a hold, a ramp down, stop."""

    def __init__(self, base_users: int, peak_users: int, ramp_s: float, hold_s: float):
        if not (0 <= base_users <= peak_users and peak_users >= 1 and ramp_s > 0 and hold_s >= 0):
            raise ValueError("lunch rush: need 0 <= base <= peak, peak >= 1, ramp > 0 s, hold >= 0 s")
        self.base, self.peak, self.ramp_s, self.hold_s = base_users, peak_users, ramp_s, hold_s

    @property
    def duration_s(self) -> float:
        return 2 * self.ramp_s + self.hold_s

    def tick(self, t: float) -> tuple[int, float] | None:
        rate = max(1.0, (self.peak - self.base) / self.ramp_s)  # users per second on the ramps
        if t >= self.duration_s:
            return None
        if t < self.ramp_s:
            frac = t / self.ramp_s
        elif t < self.ramp_s + self.hold_s:
            frac = 1.0
        else:
            frac = (self.duration_s - t) / self.ramp_s
        users = max(1, self.base + math.ceil((self.peak - self.base) * frac))
        return users, rate


class StepRamp:
    """Users in steps (``start``, ``start + step``, ... ``max``), each held ``step_s`` seconds, to
    find the knee: the rate at which p99 first crosses ``p99_limit_ms``. Stops one step after the
    knee (or after the last step). ``record(...)`` is fed each step's figures by the locustfile."""

    def __init__(self, start_users: int, step_users: int, max_users: int, step_s: float,
                 p99_limit_ms: float):
        if not (1 <= start_users <= max_users and step_users >= 1 and step_s > 0 and p99_limit_ms > 0):
            raise ValueError("step ramp: need 1 <= start <= max users, step >= 1, step time > 0 s, "
                             "p99 limit > 0 ms")
        self.start, self.step, self.max = start_users, step_users, max_users
        self.step_s, self.p99_limit_ms = step_s, p99_limit_ms
        self.steps: list[dict] = []  # one per finished step: users, rps, p99_ms

    def users_of(self, k: int) -> int:
        return min(self.max, self.start + k * self.step)

    @property
    def step_count(self) -> int:
        return 1 + math.ceil((self.max - self.start) / self.step)

    def tick(self, t: float) -> tuple[int, float] | None:
        k = int(t // self.step_s)
        if k >= self.step_count or self._knee_index() is not None and k > self._knee_index() + 1:
            return None
        users = self.users_of(k)
        return users, float(max(users, 1))  # each step's users at once: the step is the measure

    def record(self, users: int, rps: float, p99_ms: float) -> None:
        self.steps.append({"users": users, "rps": round(rps, 1), "p99_ms": round(p99_ms, 2)})

    def _knee_index(self) -> int | None:
        for i, s in enumerate(self.steps):
            if s["p99_ms"] > self.p99_limit_ms:
                return i
        return None

    def report(self) -> dict:
        """The steps, and the knee: the first step over the limit and the last one under it."""
        i = self._knee_index()
        knee = None
        if i is not None:
            knee = {"users": self.steps[i]["users"], "rps": self.steps[i]["rps"],
                    "p99_ms": self.steps[i]["p99_ms"],
                    "last_under": self.steps[i - 1] if i > 0 else None}
        return {"p99_limit_ms": self.p99_limit_ms, "step_s": self.step_s, "steps": self.steps,
                "knee": knee}


def percentile_of_counts(counts: dict, p: float) -> float:
    """The p-th percentile of locust's response-time histogram ({rounded ms: count})."""
    total = sum(counts.values())
    if not total:
        return 0.0
    rank, seen = p * total, 0
    for ms in sorted(counts):
        seen += counts[ms]
        if seen >= rank:
            return float(ms)
    return float(max(counts))


def shape_from_env(env: dict) -> LunchRush | StepRamp | None:
    """The schedule bench/load.py chose (CARDCORE_LOAD_SHAPE, JSON), or None: a plain run."""
    text = env.get("CARDCORE_LOAD_SHAPE")
    if not text:
        return None
    spec = json.loads(text)
    kind = spec.pop("kind")
    return {"lunch": LunchRush, "steps": StepRamp}[kind](**spec)


# ---- TLS: a certificate per terminal --------------------------------------------------------

_STEM_RE = re.compile(r"terminal-[1-9][0-9]*")


def terminal_cert_files(cert_dir: str, terminal_id: int) -> tuple[str, str]:
    """Where a terminal's client certificate and key are: the names ``cardcore certs client
    terminal:ID`` gives them (server/certs.py). The server matches the certificate's terminal
    to the swipe's, so each locust user presents its own."""
    stem = f"terminal-{terminal_id}"
    assert _STEM_RE.fullmatch(stem)
    return os.path.join(cert_dir, f"{stem}.pem"), os.path.join(cert_dir, f"{stem}.key")
