"""Synthetic e-commerce interaction logs: the default data source of the demo and the tests.

Realism that matters downstream:
- heavy-tailed user activity (log-normal weights) and item popularity (Zipf over a fixed
  permutation of items), so DP bounding and partition selection see realistic skew;
- stable user tastes: each user has two favourite categories, and most of the user's
  sessions focus on one of them, so a user's items co-occur across sessions and days (what
  a recommender learns beyond popularity);
- sessions with a category focus and a view -> add_to_cart -> purchase funnel
  (plus remove_from_cart), per-item prices by category, quantities;
- a daily rhythm (lunch and evening peaks, night trough);
- the direct identifiers of the landing contract: email, ip, user_agent, and free-text
  search queries that sometimes contain an email or a phone number.

Users are a fixed population derived from ``seed`` alone, so the same user keeps the same
user_id, email, device and address on every day; the day's behaviour is drawn from
``(seed, date)``. ``bad_rate`` replaces that share of records by malformed ones, spread over
every quarantine reason, and adds exact duplicates by event_id.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from privrec_pipeline import lake as lk
from privrec_pipeline.catalog import ensure_snapshot
from privrec_pipeline.schema import MAX_RECORD_BYTES, QuarantineReason

if TYPE_CHECKING:
    import pyarrow as pa

N_CATEGORIES = 24
CATEGORY_NAMES = [
    "books", "music", "movies", "games", "toys", "garden", "tools", "kitchen", "sports",
    "outdoor", "beauty", "health", "baby", "pets", "office", "electronics", "computers",
    "phones", "cameras", "fashion", "shoes", "jewelry", "home", "grocery",
]
# A noun per category (same order as CATEGORY_NAMES) for the items' public titles.
CATEGORY_NOUNS = [
    "novel", "album", "film", "board game", "toy", "planter", "drill", "pan", "ball", "tent", "cream",
    "vitamin", "stroller", "leash", "notebook", "speaker", "laptop", "phone case", "lens", "jacket", "sneaker",
    "ring", "lamp", "coffee",
]
QUERY_WORDS = [
    "cheap", "best", "red", "blue", "wireless", "organic", "kids", "gift", "sale", "new",
    "large", "small", "set", "pro", "mini", "classic", "vintage", "eco", "fast", "smart",
]
USER_AGENTS = [  # (user agent, share of users)
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", 0.30),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36", 0.25),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36", 0.25),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 Safari/605.1.15", 0.10),
    ("Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148", 0.07),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", 0.03),
]
FIRST_NAMES = ["anna", "ben", "chloe", "david", "emma", "felix", "grace", "hugo", "ines", "jonas",
               "kim", "liam", "mia", "noah", "olga", "paul", "rosa", "sam", "tara", "yusuf"]
ZONES = ["Z", "+00:00", "+01:00", "+02:00", "-05:00"]
P_CART, P_PURCHASE, P_REMOVE = 0.12, 0.35, 0.15  # funnel: per view, per cart, per cart
P_QUERY, P_QUERY_PII = 0.08, 0.05  # share of views with a search query; of those, with PII
P_TASTE, P_SECOND_TASTE = 0.8, 0.35  # sessions focused on a favourite category; on the second one

# Malformed kinds injected by bad_rate; duplicates are added on top (they are valid records).
BAD_KINDS: tuple[str, ...] = tuple(r.value for r in QuarantineReason)


@dataclass(frozen=True)
class GeneratorConfig:
    """Parameters of one generated day. Errors name the field."""

    date: dt.date
    events: int = 100_000
    users: int = 5_000
    items: int = 2_000
    seed: int = 0
    bad_rate: float = 0.0
    files: int = 4

    def __post_init__(self) -> None:
        for name in ("events", "users", "items", "files"):
            if getattr(self, name) < 1:
                raise ValueError(f"GeneratorConfig: {name} must be positive, not {getattr(self, name)}")
        if not 0.0 <= self.bad_rate < 0.5:
            raise ValueError(f"GeneratorConfig: bad_rate must be in [0, 0.5), not {self.bad_rate}")


@dataclass
class GenerationReport:
    date: str
    path: str
    files: list[str]
    records: int
    valid_events: int
    bad_records: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class UserPopulation:
    """Stable per-user attributes, a function of the seed only."""

    user_ids: np.ndarray
    activity: np.ndarray  # sampling weights, heavy-tailed
    emails: np.ndarray
    ips: np.ndarray
    agents: np.ndarray
    tastes: np.ndarray  # (users, 2): favourite category indices


def user_population(n_users: int, seed: int) -> UserPopulation:
    rng = np.random.default_rng([seed, 0x05E5])
    raw = rng.integers(0, 2**48, size=n_users, dtype=np.int64)
    user_ids = np.array([f"usr_{v:012x}" for v in raw])
    activity = rng.lognormal(mean=0.0, sigma=1.3, size=n_users)
    first = rng.choice(FIRST_NAMES, size=n_users)
    emails = np.array([f"{f}.{v % 100000:05d}@example.com" for f, v in zip(first, raw)])
    v6 = rng.random(n_users) < 0.15
    octets = rng.integers(1, 255, size=(n_users, 4))
    ips = np.array([
        f"2001:db8:{a:x}:{b:x}::{c:x}" if is6 else f"{a % 223 + 1}.{b}.{c}.{d}"
        for is6, (a, b, c, d) in zip(v6, octets)
    ])
    agent_p = np.array([p for _, p in USER_AGENTS])
    agents = np.array([a for a, _ in USER_AGENTS])[rng.choice(len(USER_AGENTS), size=n_users, p=agent_p / agent_p.sum())]
    first_taste = rng.integers(0, N_CATEGORIES, size=n_users)
    tastes = np.stack([first_taste, (first_taste + rng.integers(1, N_CATEGORIES, size=n_users)) % N_CATEGORIES], axis=1)
    return UserPopulation(user_ids, activity / activity.sum(), emails, ips, agents, tastes)


def _catalog(n_items: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Item ids, category index, price, popularity weight (Zipf s=1.1 over a fixed permutation)."""
    rng = np.random.default_rng([seed, 0xCA7A])
    item_ids = np.array([f"itm_{i:06d}" for i in range(n_items)])
    category = rng.integers(0, N_CATEGORIES, size=n_items)
    base_price = rng.lognormal(mean=3.0, sigma=0.6, size=N_CATEGORIES)
    price = np.round(base_price[category] * rng.lognormal(0.0, 0.4, size=n_items), 2)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    popularity = popularity[rng.permutation(n_items)]
    return item_ids, category, price, popularity / popularity.sum()


def catalog_table(n_items: int, seed: int) -> "pa.Table":
    """The generator's item catalog (what a shop publishes): id, category, price and a title
    made of a word, the category's noun and the id's number; every item is available."""
    import pyarrow as pa

    item_ids, category, price, _ = _catalog(n_items, seed)
    rng = np.random.default_rng([seed, 0x717E])
    words = np.array(QUERY_WORDS)[rng.integers(0, len(QUERY_WORDS), size=n_items)]
    nouns = np.array(CATEGORY_NOUNS)[category]
    titles = [f"{w.capitalize()} {n} {i}" for i, (w, n) in enumerate(zip(words, nouns, strict=True))]
    return pa.table({"item_id": item_ids, "category": np.array(CATEGORY_NAMES)[category], "price": price,
                     "title": titles, "available": np.ones(n_items, dtype=bool)})


def _session_start_seconds(rng: np.random.Generator, n: int) -> np.ndarray:
    """Seconds after midnight (UTC) with a daily rhythm: lunch and evening peaks, night trough."""
    comp = rng.choice(3, size=n, p=[0.35, 0.45, 0.20])
    centre = np.array([12.5, 20.0, 9.0])[comp]
    spread = np.array([2.0, 2.0, 4.0])[comp]
    hours = np.mod(rng.normal(centre, spread), 24.0)
    return hours * 3600.0


@dataclass(frozen=True)
class DayEvents:
    """The day's valid events as parallel arrays (indices into users, sessions and items)."""

    event_id: np.ndarray
    seconds: np.ndarray  # seconds after midnight UTC
    event_type: np.ndarray
    user: np.ndarray
    session: np.ndarray
    item: np.ndarray
    quantity: np.ndarray
    with_query: np.ndarray


def _events_frame(cfg: GeneratorConfig, n_valid: int) -> tuple[
    DayEvents, UserPopulation, np.ndarray, np.ndarray, np.ndarray, np.random.Generator
]:
    """Exactly ``n_valid`` valid events of the day, before serialization."""
    users = user_population(cfg.users, cfg.seed)
    item_ids, item_cat, item_price, item_pop = _catalog(cfg.items, cfg.seed)
    rng = np.random.default_rng([cfg.seed, cfg.date.toordinal()])

    # Views: expected events per view = 1 + P_CART * (1 + P_PURCHASE + P_REMOVE).
    per_view = 1.0 + P_CART * (1.0 + P_PURCHASE + P_REMOVE)
    n_views = int(np.ceil(n_valid / per_view * 1.02)) + 8
    mean_session = 6.0
    n_sessions = max(1, int(np.ceil(n_views / mean_session)))
    sess_user = rng.choice(cfg.users, size=n_sessions, p=users.activity)
    # Most sessions browse one of the user's favourite categories, the others any category.
    favourite = users.tastes[sess_user, (rng.random(n_sessions) < P_SECOND_TASTE).astype(np.int64)]
    sess_cat = np.where(rng.random(n_sessions) < P_TASTE, favourite, rng.integers(0, N_CATEGORIES, size=n_sessions))
    sess_start = _session_start_seconds(rng, n_sessions)
    view_session = np.sort(rng.integers(0, n_sessions, size=n_views))

    # Items: 70% from the session's category focus, else from the whole catalog, by popularity.
    from_focus = rng.random(n_views) < 0.7
    view_item = rng.choice(cfg.items, size=n_views, p=item_pop)
    cat_order = np.argsort(item_cat, kind="stable")
    cat_bounds = np.searchsorted(item_cat[cat_order], np.arange(N_CATEGORIES + 1))
    focus_cat = sess_cat[view_session]
    lo, hi = cat_bounds[focus_cat], cat_bounds[focus_cat + 1]
    has_items = hi > lo
    pick = lo + np.floor(rng.power(0.3, size=n_views) * np.maximum(hi - lo, 1)).astype(np.int64)
    focus_item = cat_order[np.minimum(pick, len(cat_order) - 1)]
    view_item = np.where(from_focus & has_items, focus_item, view_item)

    # Times: session start plus cumulative exponential gaps (mean 45 s) within the session.
    gaps = rng.exponential(45.0, size=n_views)
    first_of_session = np.r_[True, view_session[1:] != view_session[:-1]]
    cum = np.cumsum(gaps)
    session_base = np.maximum.accumulate(np.where(first_of_session, cum - gaps, 0.0))
    view_t = sess_start[view_session] + (cum - session_base)

    # Funnel follow-ups of a view, a little later, same item and session. Purchase and
    # remove_from_cart are timed after the add_to_cart, so the funnel order holds in time.
    cart = rng.random(n_views) < P_CART
    purchase = cart & (rng.random(n_views) < P_PURCHASE)
    remove = cart & ~purchase & (rng.random(n_views) < P_REMOVE / (1 - P_PURCHASE))
    cart_t = np.zeros(n_views)
    cart_t[cart] = view_t[cart] + rng.exponential(60.0, cart.sum())
    parts = [
        ("view", np.arange(n_views), view_t),
        ("add_to_cart", np.flatnonzero(cart), cart_t[cart]),
        ("purchase", np.flatnonzero(purchase), cart_t[purchase] + 90 + rng.exponential(300.0, purchase.sum())),
        ("remove_from_cart", np.flatnonzero(remove), cart_t[remove] + 60 + rng.exponential(200.0, remove.sum())),
    ]
    etype = np.concatenate([np.full(len(idx), name) for name, idx, _ in parts])
    src = np.concatenate([idx for _, idx, _ in parts])
    t = np.concatenate([tt for _, _, tt in parts])
    keep = np.sort(rng.permutation(len(src))[:n_valid])
    etype, src, t = etype[keep], src[keep], np.clip(t[keep], 0.0, 86399.999)

    session = view_session[src]
    user = sess_user[session]
    item = view_item[src]
    n = len(src)
    qty = np.where(np.isin(etype, ["add_to_cart", "purchase", "remove_from_cart"]),
                   1 + rng.binomial(2, 0.15, size=n), 1)
    with_query = (etype == "view") & (rng.random(n) < P_QUERY)
    event_ids = np.frombuffer(rng.bytes(16 * n).hex().encode("ascii"), dtype="S32").astype(str)
    return DayEvents(event_ids, t, etype, user, session, item, qty, with_query), users, item_ids, item_cat, item_price, rng


def _search_queries(rng: np.random.Generator, n: int, emails: np.ndarray) -> list[str]:
    words = rng.choice(QUERY_WORDS, size=(n, 2))
    cats = rng.choice(CATEGORY_NAMES, size=n)
    pii = rng.random(n)
    out = []
    for i in range(n):
        q = f"{words[i, 0]} {cats[i]} {words[i, 1]}"
        if pii[i] < P_QUERY_PII / 2:
            q += f" contact {emails[i]}"
        elif pii[i] < P_QUERY_PII:
            q += f" call +1 555-{rng.integers(100, 999)}-{rng.integers(1000, 9999)}"
        out.append(q)
    return out


def _json_str(values: np.ndarray) -> np.ndarray:
    return np.array([json.dumps(v, ensure_ascii=False) for v in values], dtype=object)


def _serialize(cfg: GeneratorConfig, ev: DayEvents, users: UserPopulation, item_ids: np.ndarray,
               item_cat: np.ndarray, item_price: np.ndarray, rng: np.random.Generator) -> list[bytes]:
    """One JSON line per event (bytes, without newline).

    Per-user, per-session and per-item parts are serialized once and joined per event with
    one f-string: several times faster than serializing a record per event.
    """
    user_part = ('"user_id":' + _json_str(users.user_ids) + ',"email":' + _json_str(users.emails)
                 + ',"ip":' + _json_str(users.ips) + ',"user_agent":' + _json_str(users.agents))
    item_part = ('"item_id":' + _json_str(item_ids) + ',"category":'
                 + _json_str(np.array(CATEGORY_NAMES)[item_cat]) + ',"price":'
                 + np.array([repr(float(p)) for p in item_price], dtype=object))
    n_sessions = int(ev.session.max()) + 1 if len(ev.session) else 0
    session_part = np.array([f'"ses_{cfg.date:%Y%m%d}_{s:08x}"' for s in range(n_sessions)], dtype=object)

    # Local wall-clock time = UTC + zone offset, formatted vectorized (numpy), then the zone.
    zone_idx = rng.choice(len(ZONES), size=len(ev.seconds), p=[0.5, 0.1, 0.2, 0.1, 0.1])
    offset_s = np.array([0, 0, 3600, 7200, -5 * 3600])[zone_idx]
    midnight = np.datetime64(cfg.date.isoformat(), "ms")
    local = midnight + ((ev.seconds + offset_s) * 1000).astype("int64").astype("timedelta64[ms]")
    times = np.char.add(np.datetime_as_string(local, unit="ms"), np.array(ZONES)[zone_idx])

    queries = np.full(len(ev.seconds), "null", dtype=object)
    wq = ev.with_query
    queries[wq] = _json_str(np.array(_search_queries(rng, int(wq.sum()), users.emails[ev.user[wq]]), dtype=object))
    rows = zip(ev.event_id, times, ev.event_type, user_part[ev.user], session_part[ev.session],
               item_part[ev.item], ev.quantity.tolist(), queries)
    lines = [
        f'{{"event_id":"{e}","event_time":"{t}","event_type":"{k}",{u},"session_id":{s},{i},'
        f'"quantity":{q},"search_query":{sq}}}'
        for e, t, k, u, s, i, q, sq in rows
    ]
    return [line.encode("utf-8") for line in lines]


def _bad_record(kind: str, good: dict, cfg: GeneratorConfig, i: int) -> bytes:
    """A malformed landing line that collect must quarantine with reason ``kind``."""
    rec = dict(good)
    if kind == "invalid_utf8":
        return json.dumps(rec).encode("utf-8")[:-2] + b"\xff\xfe\"}"
    if kind == "oversize_record":
        rec["search_query"] = "x" * (MAX_RECORD_BYTES + 10)
        return json.dumps(rec).encode("utf-8")
    if kind == "malformed_json":
        return json.dumps(rec).encode("utf-8")[: 20 + i % 30]
    if kind == "not_an_object":
        return json.dumps([rec["event_id"], rec["user_id"]]).encode("utf-8")
    if kind == "missing_field":
        rec.pop(["user_id", "item_id", "event_type", "event_id"][i % 4])
        return json.dumps(rec).encode("utf-8")
    if kind == "wrong_type":
        field_name, value = [("price", "abc"), ("quantity", 1.5), ("user_id", {"id": 1}), ("event_type", 3)][i % 4]
        rec[field_name] = value
        return json.dumps(rec).encode("utf-8")
    if kind == "bad_timestamp":
        rec["event_time"] = ["2026-13-45T99:00:00Z", f"{cfg.date}T10:00:00", "yesterday"][i % 3]
        return json.dumps(rec).encode("utf-8")
    if kind == "oversize_field":
        rec["user_agent"] = "A" * 5000
        return json.dumps(rec).encode("utf-8")
    if kind == "unknown_event_type":
        rec["event_type"] = ["click", "VIEW", "purchase "][i % 3]
        return json.dumps(rec).encode("utf-8")
    if kind == "event_time_outside_interval":
        day = cfg.date + dt.timedelta(days=-1 if i % 2 == 0 else 1)
        rec["event_time"] = f"{day}T12:00:00Z"
        return json.dumps(rec).encode("utf-8")
    if kind == "unknown_item":  # an item the generator's catalog does not list
        rec["item_id"] = f"itm_discontinued_{i:06d}"
        return json.dumps(rec).encode("utf-8")
    raise ValueError(f"unknown bad record kind {kind!r}")


def generate_day(cfg: GeneratorConfig, lake: str) -> GenerationReport:
    """Write one day of logs to ``landing/interactions/dt=D/`` atomically and return a report."""
    n_bad = round(cfg.events * cfg.bad_rate)
    n_dups = n_bad // (len(BAD_KINDS) + 1)
    n_valid = cfg.events - n_bad
    events, users, item_ids, item_cat, item_price, rng = _events_frame(cfg, n_valid)
    lines = _serialize(cfg, events, users, item_ids, item_cat, item_price, rng)

    bad_counts = {k: 0 for k in BAD_KINDS}
    extra: list[bytes] = []
    if n_bad:
        # Malformed records are built from valid-looking ones (with fresh event ids), so each
        # fails exactly one check; duplicates repeat existing lines byte for byte.
        templates = rng.choice(len(lines), size=n_bad, replace=True)
        for j in range(n_bad - n_dups):
            kind = BAD_KINDS[j % len(BAD_KINDS)]
            good = json.loads(lines[templates[j]])
            good["event_id"] = f"bad{j:029x}"
            extra.append(_bad_record(kind, good, cfg, j // len(BAD_KINDS)))
            bad_counts[kind] += 1
        extra.extend(lines[k] for k in templates[n_bad - n_dups:])
    all_lines = lines + extra
    order = rng.permutation(len(all_lines))

    part = lk.path(lk.partition_uri(lake, "landing", cfg.date))
    files: list[str] = []
    with lk.replacing(part, last="_generation.json") as staging:
        for f, chunk in enumerate(np.array_split(order, cfg.files)):
            name = f"events-{f:03d}.jsonl.gz"
            # compresslevel 1: landing files are transient; speed matters more than size.
            with gzip.open(staging / name, "wb", compresslevel=1) as fh:
                fh.write(b"\n".join(all_lines[k] for k in chunk))
                if len(chunk):
                    fh.write(b"\n")
            files.append(name)
        report = GenerationReport(
            date=cfg.date.isoformat(), path=str(part), files=files, records=len(all_lines),
            valid_events=n_valid, bad_records=bad_counts, duplicates=n_dups,
        )
        # Hidden from Spark's readers (leading underscore): what was injected, for tests and demos.
        (staging / "_generation.json").write_text(report.to_json(), encoding="utf-8")
    # The shop's public catalog (one snapshot while the items stay the same).
    ensure_snapshot(lake, cfg.date, catalog_table(cfg.items, cfg.seed),
                    f"privrec generate (items {cfg.items}, seed {cfg.seed})")
    return report


def day_events(cfg: GeneratorConfig) -> DayEvents:
    """The day's valid events as arrays, without writing landing files (benchmarks, tests);
    the same events ``generate_day`` writes for ``cfg`` with ``bad_rate`` 0."""
    return _events_frame(cfg, cfg.events)[0]
