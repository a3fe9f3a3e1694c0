"""MovieLens (100k / 1m / 20m) -> ranking, funnel and sequence datasets.

Fixed vocabularies (so every MovieLens size shares one config shape):
- gender: M=0, F=1 (0 when unknown).
- age_bucket: 0 unknown, 1 <18, 2 18-24, 3 25-34, 4 35-44, 5 45-49, 6 50-55, 7 56+ (ml-1m's age
  codes 1/18/25/35/45/50/56 fall into 1..7 by the same rule).
- occupation: ml-100k's 21 names sorted alphabetically -> 0..20; ml-1m codes 0..20 as given.
- genre (20): 0 unknown / "(no genres listed)", GENRES[1:19] -> 1..18, IMAX -> 19.
- year_bucket (10): 0 unknown, 1 <1930, 2..7 the 1930s..1980s, 8 1990-1994, 9 >=1995.
Users and items are remapped to 1..n by sorted raw id (identity for ml-100k); 0 is padding.

History: an event's history is the user's events with a timestamp strictly earlier (same-second
events would leak), the last `history` of them. pos/neg sub-histories filter that same window on
the raw rating (>= 4 / <= 2, the `like` rule). hist_len_log and hist_mean_rating use the full
prior history. Work is done in user chunks with numpy so ml-20m streams in bounded memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from trec_rank.data.prepare.common import (
    SplitWriter,
    Stats,
    columns_entry,
    list_array,
    write_manifest,
)
from trec_rank.data.prepare.ml_sources import GENRES, read_movielens

SPLITS = ("train", "valid", "test")
CHUNK_EVENTS = 65_536
I64, L64, F32 = pa.int64(), pa.list_(pa.int64()), pa.float32()
RANKING = pa.schema([
    ("user_id", I64), ("age_bucket", I64), ("gender", I64), ("occupation", I64), ("item_id", I64),
    ("genres", L64), ("item_genre", I64), ("year_bucket", I64), ("hist_item_id", L64), ("hist_rating", L64),
    ("hist_ts", L64), ("hist_genre", L64), ("pos_item_id", L64), ("neg_item_id", L64),
    ("hist_len_log", F32), ("hist_mean_rating", F32), ("timestamp", I64), ("rating", F32), ("like", F32)])
FUNNEL = RANKING.append(pa.field("watch", F32))
SEQUENCES = pa.schema([("user_id", I64), ("age_bucket", I64), ("gender", I64), ("occupation", I64),
                       ("item_ids", L64), ("timestamps", L64), ("ratings", L64)])
TABLES = {"age": 8, "gender": 2, "occupation": 21, "genre": 20, "year": 10}



class _Events:
    """All ratings sorted by (user, timestamp, item) plus per-event history bounds and splits."""

    def __init__(self, u_raw: np.ndarray, i_raw: np.ndarray, rating: np.ndarray, ts: np.ndarray,
                 history: int) -> None:
        self.users, uid = np.unique(u_raw, return_inverse=True)
        self.items, iid = np.unique(i_raw, return_inverse=True)
        order = np.lexsort((iid, ts, uid))
        self.uid, self.iid = uid[order] + 1, iid[order] + 1
        self.rating, self.ts = rating[order].astype(np.float64), ts[order].astype(np.int64)
        self.rint = np.ceil(self.rating).astype(np.int64)
        n_ev, self.nu, self.ni = len(self.uid), len(self.users), len(self.items)
        self.ustart = np.searchsorted(self.uid, np.arange(1, self.nu + 1))
        counts = np.diff(np.append(self.ustart, n_ev))
        self.first = self.ustart[self.uid - 1]
        n, back = counts[self.uid - 1], self.first + counts[self.uid - 1] - 1 - np.arange(n_ev)
        n_test, n_valid = (0.2 * n).astype(np.int64), (0.1 * n).astype(np.int64)
        self.split = np.where(back < n_test, 2, np.where(back < n_test + n_valid, 1, 0))
        new = np.ones(n_ev, dtype=bool)
        new[1:] = (self.uid[1:] != self.uid[:-1]) | (self.ts[1:] != self.ts[:-1])
        self.hend = np.maximum.accumulate(np.where(new, np.arange(n_ev), 0))
        self.hstart = np.maximum(self.first, self.hend - history)
        prefix = np.concatenate([[0.0], np.cumsum(self.rating)])
        full = self.hend - self.first
        self.hist_len_log = np.log1p(full).astype(np.float32)
        total = prefix[self.hend] - prefix[self.first]
        self.hist_mean = np.where(full > 0, total / np.maximum(full, 1), 0.0).astype(np.float32)
        self.rated = np.unique(self.uid * (self.ni + 1) + self.iid)
        pop = np.bincount(self.iid, minlength=self.ni + 1)[1:].astype(np.float64)
        self.pop, self.cdf = pop, np.cumsum(pop) / pop.sum()

    def chunks(self) -> list[tuple[int, int]]:
        cuts = [0]
        for s in self.ustart[1:].tolist():
            if s - cuts[-1] >= CHUNK_EVENTS:
                cuts.append(s)
        return list(zip(cuts, [*cuts[1:], len(self.uid)]))


def _ranking_chunk(ev: _Events, a: int, b: int, user: dict, item: dict) -> pa.Table:
    rows = np.arange(a, b)
    uid, iid = ev.uid[rows], ev.iid[rows]
    lengths = ev.hend[rows] - ev.hstart[rows]
    off = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.repeat(ev.hstart[rows] - off[:-1], lengths) + np.arange(off[-1])  # history window indices
    seg = np.repeat(np.arange(len(rows)), lengths)
    h_item, h_rating = ev.iid[flat], ev.rating[flat]
    cols = {"user_id": uid, "age_bucket": user["age"][uid], "gender": user["gender"][uid],
            "occupation": user["occ"][uid], "item_id": iid, "genres": item["genres"].take(pa.array(iid)),
            "item_genre": item["genre"][iid], "year_bucket": item["year"][iid],
            "hist_item_id": list_array(off, h_item), "hist_rating": list_array(off, ev.rint[flat]),
            "hist_ts": list_array(off, ev.ts[flat]), "hist_genre": list_array(off, item["genre"][h_item])}
    for name, mask in (("pos_item_id", h_rating >= 4), ("neg_item_id", h_rating <= 2)):
        sub = np.concatenate([[0], np.cumsum(np.bincount(seg[mask], minlength=len(rows)))])
        cols[name] = list_array(sub, h_item[mask])
    rating = ev.rating[rows].astype(np.float32)
    cols.update(hist_len_log=ev.hist_len_log[rows], hist_mean_rating=ev.hist_mean[rows],
                timestamp=ev.ts[rows], rating=rating, like=(rating >= 4).astype(np.float32))
    return pa.table(cols).cast(RANKING)


def _negatives(ev: _Events, users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, k) unrated items per row, popularity-weighted, distinct per row; -1 pads when too few exist."""
    out = np.full((len(users), k), -1, dtype=np.int64)
    todo, width, m = np.arange(len(users)), 2 * k + 8, ev.ni + 1
    for _ in range(5):
        if k == 0 or not len(todo):
            break
        draw = np.searchsorted(ev.cdf, rng.random((len(todo), width)), side="right")
        cand = np.minimum(draw, ev.ni - 1) + 1  # popularity-weighted item ids
        keys = users[todo, None] * m + cand
        pos = np.minimum(np.searchsorted(ev.rated, keys), len(ev.rated) - 1)
        ok = ev.rated[pos] != keys
        order = np.argsort(cand, axis=1, kind="stable")
        srt = np.take_along_axis(cand, order, 1)
        dup = np.zeros_like(ok)
        np.put_along_axis(dup, order, np.pad(srt[:, 1:] == srt[:, :-1], ((0, 0), (1, 0))), 1)
        ok &= ~dup
        take = ok & (np.cumsum(ok, axis=1) <= k)
        full = take.sum(axis=1) == k
        out[todo[full]] = cand[full][take[full]].reshape(-1, k)
        todo, width = todo[~full], width * 4
    for row in todo.tolist():  # users who rated nearly every popular item: sample exactly
        u = users[row]
        end = ev.ustart[u] if u < ev.nu else len(ev.uid)
        free = np.setdiff1d(np.arange(1, m), ev.iid[ev.ustart[u - 1]:end])
        n = min(k, len(free))
        if n:
            weights = ev.pop[free - 1]
            out[row, :n] = rng.choice(free, size=n, replace=False, p=weights / weights.sum())
    return out


def _funnel(ev: _Events, t: pa.Table, k: int, rng: np.random.Generator, item: dict) -> pa.Table:
    users = t["user_id"].to_numpy()
    items = np.concatenate([t["item_id"].to_numpy()[:, None], _negatives(ev, users, k, rng)], axis=1).ravel()
    is_pos = np.zeros((len(users), k + 1), dtype=bool)
    is_pos[:, 0] = True
    valid = items > 0
    rep, items, is_pos = np.repeat(np.arange(len(users)), k + 1)[valid], items[valid], is_pos.ravel()[valid]
    f = t.take(pa.array(rep))  # user features, history and timestamp copied from the source row
    watch = is_pos.astype(np.float32)
    new = {"item_id": items, "genres": item["genres"].take(pa.array(items)),
           "item_genre": item["genre"][items], "year_bucket": item["year"][items],
           "rating": f["rating"].to_numpy() * watch, "like": f["like"].to_numpy() * watch, "watch": watch}
    return pa.table({name: new[name] if name in new else f[name] for name in FUNNEL.names}).cast(FUNNEL)


def _sequences(ev: _Events, user: dict) -> pa.Table:
    uid = np.arange(1, ev.nu + 1)
    off = np.append(ev.ustart, len(ev.uid))
    cols = {"user_id": uid, "age_bucket": user["age"][uid], "gender": user["gender"][uid],
            "occupation": user["occ"][uid], "item_ids": list_array(off, ev.iid),
            "timestamps": list_array(off, ev.ts), "ratings": list_array(off, ev.rint)}
    return pa.table(cols).cast(SEQUENCES)


def _manifest(dataset: str, source: str, params: dict, stats: Stats, files: dict, schema: pa.Schema,
              tables: dict) -> dict:
    return {"format": 1, "dataset": dataset, "source": source, "params": params,
            "splits": stats.splits_entry(files), "columns": columns_entry(schema),
            "id_ranges": stats.ranges, "tables": tables}


def prepare_movielens(name: str, out: Path, source: Path | None = None, history: int = 50,
                      negatives: int = 4, seed: int = 0) -> dict:
    """Prepare `name` into out/{ranking,funnel,sequences}; returns the top-level manifest."""
    if name not in ("ml-100k", "ml-1m", "ml-20m"):
        raise ValueError(f"unknown MovieLens dataset {name!r} (choose ml-100k, ml-1m or ml-20m)")
    out = Path(out)
    raw = read_movielens(name, source)
    ev = _Events(raw.users, raw.items, raw.ratings, raw.timestamps, history)
    user = {key: np.zeros(ev.nu + 1, dtype=np.int64) for key in ("age", "gender", "occ")}
    for k, u in enumerate(ev.users.tolist(), 1):
        user["age"][k], user["gender"][k], user["occ"][k] = raw.user_side.get(u, (0, 0, 0))
    genre_lists = [[0]] + [raw.item_side.get(i, ([0], 0))[0] for i in ev.items.tolist()]
    item = {"genres": pa.array(genre_lists, type=L64), "genre": np.array([g[0] for g in genre_lists]),
            "year": np.array([0] + [raw.item_side.get(i, ([0], 0))[1] for i in ev.items.tolist()])}
    rng = np.random.default_rng(seed)
    writers = {kind: {s: SplitWriter(out / kind / s, schema) for s in SPLITS}
               for kind, schema in (("ranking", RANKING), ("funnel", FUNNEL))}
    stats = {"ranking": Stats(["like"]), "funnel": Stats(["watch", "like"])}
    for a, b in ev.chunks():
        chunk = _ranking_chunk(ev, a, b, user, item)
        split = ev.split[a:b]
        for s, split_name in enumerate(SPLITS):
            t = chunk.filter(pa.array(split == s))
            f = _funnel(ev, t, negatives, rng, item)
            for kind, table in (("ranking", t), ("funnel", f)):
                writers[kind][split_name].write(table)
                stats[kind].update(split_name, table)
    params = {"history": history, "negatives": negatives, "seed": seed}
    tables = {"user": ev.nu + 1, "item": ev.ni + 1, **TABLES}
    datasets = {}
    for kind, schema in (("ranking", RANKING), ("funnel", FUNNEL)):
        files = {s: w.close() for s, w in writers[kind].items()}
        datasets[kind] = _manifest(f"{name}/{kind}", raw.source, params, stats[kind], files, schema, tables)
        write_manifest(out / kind, datasets[kind])
    seq = SplitWriter(out / "sequences", SEQUENCES)
    seq_table = _sequences(ev, user)
    seq.write(seq_table)
    seq_stats = Stats([])
    seq_stats.update("all", seq_table)
    datasets["sequences"] = _manifest(f"{name}/sequences", raw.source, params, seq_stats,
                                      {"all": seq.close()}, SEQUENCES, tables)
    write_manifest(out / "sequences", datasets["sequences"])
    top = {"format": 1, "dataset": name, "source": raw.source, "params": params,
           "vocab": {"genre": GENRES, "year_bucket": ["unknown", "<1930", "1930s", "1940s", "1950s", "1960s",
                                                     "1970s", "1980s", "1990-1994", ">=1995"]},
           "datasets": datasets}
    write_manifest(out, top)
    return top
