"""De-duplication, near-duplicate grouping and deterministic group-wise train/validation/test splits.

- :func:`dedupe` drops rows whose normalised text (lower case, punctuation and extra spaces removed)
  repeats an earlier row; the first occurrence wins.
- :func:`assign_groups` puts near-duplicates in one group: two rows share a group when their
  content-word sets (stop-words removed, "my <relation>, <Name>" collapsed to "my person") have a
  Jaccard similarity >= :data:`JACCARD_THRESHOLD` (0.5), or when they were given the same ``group``
  already. Groups are the connected components (``scipy.sparse.csgraph.connected_components``).
  Candidate pairs come from an exact prefix filter, so this is fast for thousands of rows.
- :func:`split_by_group` assigns whole groups to splits using a SHA-256 of the group id (never
  Python's salted ``hash()``), separately for safe and unsafe groups so both labels land in every
  split in about the requested fractions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sapguard.data.records import SPLITS, Record
from sapguard.errors import SapError

log = logging.getLogger(__name__)

JACCARD_THRESHOLD = 0.5

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves please give tell me provide
    detailed instructions step write""".split()
)

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_RELATION_NAME = re.compile(r"\bmy ([a-z-]+(?: [a-z-]+)?), [A-Z][A-Za-z'-]+")


def words(text: str) -> list[str]:
    """The one word tokeniser of sapguard: NFKC, case-folded, runs of letters and digits.

    Used for de-duplication keys, near-duplicate groups and the bench's on-topic check.
    """
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, words only, single spaces: the de-duplication key of a text."""
    return " ".join(words(text))


def _dedupe_key(record: Record) -> str:
    key = normalize_text(record.prompt)
    if record.response is not None:
        key += "\x1f" + normalize_text(record.response)
    for user, assistant in record.history:
        key += "\x1e" + normalize_text(user) + "\x1f" + normalize_text(assistant)
    return key


def dedupe(records: Sequence[Record]) -> list[Record]:
    """Drop rows whose normalised (prompt, response) repeats an earlier row; the first one wins.

    Rows that collide with a different label are counted and logged (the first label is kept).
    """
    seen: dict[str, Record] = {}
    out: list[Record] = []
    conflicts = 0
    for record in records:
        key = _dedupe_key(record)
        if key in seen:
            if seen[key].is_safe != record.is_safe:
                conflicts += 1
            continue
        seen[key] = record
        out.append(record)
    if conflicts:
        log.info("dedupe: %d duplicate rows had a different label; kept the first", conflicts)
    return out


def content_tokens(text: str) -> frozenset[str]:
    """The content-word set used for near-duplicate detection."""
    found = words(_RELATION_NAME.sub("my person", unicodedata.normalize("NFKC", text)))
    tokens = frozenset(w for w in found if w not in STOP_WORDS)
    return tokens or frozenset(found)


def connected_anchors(n: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Smallest member index of each node's connected component in an undirected graph on ``0..n-1``.

    Args:
        n: Number of nodes.
        edges: Pairs of nodes that belong to the same component (repeats and self-loops are fine).

    Returns:
        ``anchors[i]``: the smallest node index in node ``i``'s component.
    """
    if n == 0:
        return []
    pairs = np.asarray(list(edges), dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_components, labels = connected_components(graph, directed=False)
    smallest = np.full(n_components, n, dtype=np.int64)
    np.minimum.at(smallest, labels, np.arange(n))
    return [int(a) for a in smallest[labels]]


def near_duplicate_components(token_sets: Sequence[frozenset[str]], threshold: float = JACCARD_THRESHOLD) -> list[int]:
    """Component index (smallest member index) per set, joining pairs with Jaccard >= ``threshold``.

    Uses prefix filtering: with tokens ordered by global rarity, two sets with Jaccard >= t must
    share a token among the first ``|A| - ceil(t * |A|) + 1`` tokens of each, so only rows that
    share such a token are compared.
    """
    n = len(token_sets)
    edges: list[tuple[int, int]] = []
    freq: dict[str, int] = defaultdict(int)
    for tokens in token_sets:
        for tok in tokens:
            freq[tok] += 1
    index: dict[str, list[int]] = defaultdict(list)
    for i, tokens in enumerate(token_sets):
        if not tokens:
            continue
        ordered = sorted(tokens, key=lambda t: (freq[t], t))
        prefix = len(ordered) - math.ceil(threshold * len(ordered)) + 1
        candidates: set[int] = set()
        for tok in ordered[:prefix]:
            candidates.update(index[tok])
            index[tok].append(i)
        for j in candidates:
            other = token_sets[j]
            small, large = sorted((len(tokens), len(other)))
            if small < threshold * large:
                continue
            inter = len(tokens & other)
            if inter >= threshold * (len(tokens) + len(other) - inter):
                edges.append((i, j))
    return connected_anchors(n, edges)


def assign_groups(records: Sequence[Record], threshold: float = JACCARD_THRESHOLD) -> list[Record]:
    """Give every record a ``group`` so that near-duplicates (and rows given the same group) share one.

    The group id is ``"g" + sha256(<normalised text of the component's first row>)[:12]``, so it is
    stable across runs and independent of row order within the input's components.
    """
    token_sets = [content_tokens(r.prompt + (" " + r.response if r.response else "")) for r in records]
    edges = list(enumerate(near_duplicate_components(token_sets, threshold)))
    by_given: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.group is not None:
            edges.append((i, by_given.setdefault(r.group, i)))
    roots = connected_anchors(len(records), edges)
    members: dict[int, list[int]] = defaultdict(list)
    for i, root in enumerate(roots):
        members[root].append(i)
    names: dict[int, str] = {}
    for root, idx in members.items():
        anchor = min(_dedupe_key(records[i]) for i in idx)
        names[root] = "g" + hashlib.sha256(anchor.encode("utf-8")).hexdigest()[:12]
    return [replace(r, group=names[root]) for r, root in zip(records, roots)]


def _unit_hash(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_group(
    records: Sequence[Record],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> list[Record]:
    """Assign ``split`` to every record so that no group straddles splits.

    Groups (rows without a group are grouped first with :func:`assign_groups`) are stratified by
    their majority label (ties count as unsafe). Within each stratum, groups are ordered by
    ``sha256(f"{seed}:{group}")`` and filled into train, validation, test until each split holds its
    fraction of the stratum's rows. The result is deterministic and independent of input order.

    Raises:
        SapError: fractions are not three non-negative numbers summing to 1.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise SapError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if any(r.group is None for r in records):
        records = assign_groups(records)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[str(r.group)].append(i)
    strata: dict[bool, list[str]] = {True: [], False: []}
    for g, idx in groups.items():
        unsafe = sum(1 for i in idx if not records[i].is_safe)
        strata[unsafe * 2 < len(idx)].append(g)
    split_of: dict[str, str] = {}
    for names in strata.values():
        names.sort(key=lambda g: (_unit_hash(f"{seed}:{g}"), g))
        total = sum(len(groups[g]) for g in names)
        bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
        done = 0
        for g in names:
            # place the group by where its midpoint falls, which keeps small strata balanced
            mid = done + len(groups[g]) / 2
            split_of[g] = SPLITS[0] if mid <= bounds[0] else SPLITS[1] if mid <= bounds[1] else SPLITS[2]
            done += len(groups[g])
    return [replace(r, split=split_of[str(r.group)]) for r in records]
