"""Detection: per text or conversation a verdict, a risk score, per-facet margins and the facets that fired.

A conversation is a list of chat messages (``[{"role": "user", "content": "..."}, ...]``, OpenAI
format) and is read as training reads a multi-turn record (:attr:`sapguard.data.records.Record.history`):
the last user message is the prompt, the earlier exchanges are its history, rendered with the same
chat template (:func:`sapguard.models.chat.encode_prompt`), and the state is read after the whole
conversation. See :func:`conversation_from_messages` for the conversion and :func:`fit_conversation`
for how a conversation longer than the window is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sapguard.data.records import History, Record
from sapguard.errors import SapError
from sapguard.features.extract import extract_features
from sapguard.features.policies import POLICIES
from sapguard.features.views import polytope_views, tail_view
from sapguard.models.chat import encode_pair, encode_prompt, resolve_template
from sapguard.models.loading import LoadedModel, load_model
from sapguard.polytope.artifact import check_compatible
from sapguard.polytope.model import SafetyPolytope, read_in_batches

DEFAULT_WINDOW = 1024
"""Longest prompt, in tokens of the user text, read in one pass; longer texts are read in windows."""
MAX_CHARS = 200_000
"""Longest text (or conversation, all messages together) :func:`scan` accepts (about 50k tokens);
a longer one is refused with an error."""
ROLES = ("system", "user", "assistant")

Messages = Sequence[Mapping[str, Any]]
"""A conversation as chat messages: ``{"role": "system"|"user"|"assistant", "content": str}``."""
ScanItem = str | Messages
"""What :func:`scan` reads: a prompt, or a conversation as chat messages."""


@dataclass(frozen=True)
class Conversation:
    """A conversation as training reads it: the last user turn, earlier exchanges and an optional reply.

    Attributes:
        prompt: The last user message.
        history: Earlier ``(user, assistant)`` exchanges, oldest first.
        response: The assistant's reply to ``prompt`` when the conversation ends with one.
    """

    prompt: str
    history: History = field(default_factory=tuple)
    response: str | None = None

    def chars(self) -> int:
        return len(self.prompt) + len(self.response or "") + sum(len(u) + len(a) for u, a in self.history)


def _content(value: Any, at: str) -> str:
    """A message's ``content``: a string, or a list of text parts (``{"type": "text", "text": ...}``)."""
    if isinstance(value, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str) or not value.strip():
        raise SapError(f"{at}: 'content' must be a non-empty string (or a list of text parts)")
    return value


def conversation_from_messages(messages: Any, where: str = "conversation") -> Conversation:
    """Chat messages (OpenAI format) as a :class:`Conversation`, validated.

    The conversion: system messages are left out (training rows have no system turn; the server's
    moderation endpoint does the same); consecutive messages of the same role are joined with a
    blank line; the conversation must start with a user message; the last user message is the
    prompt and the exchanges before it its history. When the last message is an assistant reply,
    it is the prompt's ``response``: read in the context of the conversation as the polytope's token
    policy prescribes, the same as ``scan(..., responses=...)`` for a prompt and its reply (a
    last-prompt-token polytope reads the state before the reply).

    Raises:
        SapError: one line naming ``where``, the message number (from 1) and the field: not a list
            of objects, an unknown ``role``, an empty ``content``, no user message, or an assistant
            message before the first user message.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise SapError(f"{where}: a conversation must be a list of messages "
                       '({"role": "user"|"assistant"|"system", "content": "..."}), got ' + type(messages).__name__)
    if not messages:
        raise SapError(f"{where}: 'messages' is empty")
    turns: list[tuple[str, list[str]]] = []
    for number, message in enumerate(messages, start=1):
        at = f"{where}: message {number}"
        if not isinstance(message, Mapping):
            raise SapError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise SapError(f"{at}: unknown 'role' {role!r}; expected one of {', '.join(ROLES)}")
        content = _content(message.get("content"), at)
        if role == "system":
            continue
        if not turns and role == "assistant":
            raise SapError(f"{at}: 'role' assistant before the first user message; a conversation starts with a user message")
        if turns and turns[-1][0] == role:
            turns[-1][1].append(content)
        else:
            turns.append((role, [content]))
    if not turns:
        raise SapError(f"{where}: no user message (every 'role' is system)")
    texts = ["\n\n".join(parts) for _, parts in turns]
    response = texts.pop() if turns[-1][0] == "assistant" else None
    prompt = texts.pop()
    history = tuple((texts[i], texts[i + 1]) for i in range(0, len(texts), 2))
    return Conversation(prompt, history, response)


def fit_conversation(
    lm: LoadedModel, conversation: Conversation, template: str, window: int
) -> tuple[Conversation, int]:
    """``conversation`` cut to the window, and how many of its earlier exchanges were dropped.

    The policy: the last user turn is always read whole (in overlapping windows by :func:`scan`
    when it alone is longer than ``window``, as a single prompt is); the oldest earlier exchanges
    are dropped, one whole exchange at a time, until the conversation fits. It fits when its
    tokens under ``template`` (history, prompt and reply), less the template's fixed header and
    generation prompt that a single prompt does not count either, are at most ``window``. When
    the last turn (with its reply) does not fit alone, every earlier exchange is dropped.
    """
    if not conversation.history:
        return conversation, 0
    tok = lm.tokenizer
    prompt, response, history = conversation.prompt, conversation.response, conversation.history
    overhead = len(encode_prompt(tok, prompt, template)) - len(tok(prompt, add_special_tokens=False)["input_ids"])

    def fits(dropped: int) -> bool:
        ids, _ = encode_pair(tok, prompt, response, template, history[dropped:])
        return len(ids) - overhead <= window

    low, high = 0, len(history)  # the fewest exchanges to drop lies in [low, high]
    while low < high:  # fewer dropped is never shorter: binary search
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid + 1
    return Conversation(prompt, history[low:], response), low


@dataclass
class Verdict:
    """What the polytope says about one text.

    Attributes:
        text: The scanned prompt (for a conversation, its last user message).
        is_safe: False when any facet fires (its margin is positive).
        risk_score: Probability of unsafe, calibrated on validation data (0..1).
        score: The largest facet margin; positive means unsafe.
        margins: Per-facet margin ``v_k - offset`` by facet name.
        violated: Names of facets that fire, most violated first.
        windows: How many overlapping windows the text was read in (1 unless it was longer than the
            window; then every margin is the maximum over windows).
        earlier_turns: For a conversation, how many earlier ``(user, assistant)`` exchanges were read
            before its last user message (0 for a single prompt).
        dropped_turns: For a conversation longer than the window, how many of its oldest earlier
            exchanges were left out (:func:`fit_conversation`); 0 when it was read whole.
        tail_read: Whether the prompt's tail view (its last line, read alone; see
            :mod:`sapguard.features.views`) was read as well; every margin is then the maximum of the
            two views. Only for polytopes whose config lists the ``tail`` view.
    """

    text: str
    is_safe: bool
    risk_score: float
    score: float
    margins: dict[str, float]
    violated: list[str]
    windows: int = 1
    earlier_turns: int = 0
    dropped_turns: int = 0
    tail_read: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_MODELS: dict[tuple[str, str | None, str | None], LoadedModel] = {}


def base_model_for(poly: SafetyPolytope, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """The base model recorded in the polytope's config, loaded once per (model, device, dtype)."""
    base = poly.meta.get("base_model") or {}
    key = (str(base.get("id", "default")), device, dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(key[0], device=device, dtype=dtype, revision=None)
    lm = _MODELS[key]
    check_compatible(poly, lm.identity())
    return lm


def split_windows(lm: LoadedModel, text: str, window: int, overlap: int | None = None) -> list[str]:
    """``text`` as overlapping windows of at most ``window`` tokens (one window if it fits).

    Consecutive windows overlap by ``overlap`` tokens (default: half a window), so a request
    shorter than the overlap is wholly inside at least one window wherever it sits.
    """
    if window < 8:
        raise SapError(f"window must be at least 8 tokens, got {window}")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= window:
        return [text]
    overlap = window // 2 if overlap is None else overlap
    if not 0 <= overlap < window:
        raise SapError(f"overlap must be in [0, window), got {overlap}")
    stride = window - overlap
    starts = list(range(0, len(ids) - window + 1, stride))
    if starts[-1] + window < len(ids):
        starts.append(len(ids) - window)
    return [lm.tokenizer.decode(ids[s : s + window]) for s in starts]


def margins_for(
    poly: SafetyPolytope,
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str | None] | None = None,
    *,
    histories: Sequence[History] | None = None,
    batch_size: int = 32,
    max_length: int = 1024,
    show_progress: bool = False,
) -> torch.Tensor:
    """Per-facet margins ``[len(prompts), K]`` read as the polytope was trained.

    For a polytope trained on every response token, a text's margins are those of its most
    unsafe token; without a response, its last prompt token is read. ``histories`` (earlier
    ``(user, assistant)`` exchanges per prompt) are read as earlier chat turns, as in training.
    Sequences longer than ``max_length`` tokens keep their last tokens (as in extraction).
    """
    responses = list(responses) if responses is not None else [None] * len(prompts)
    histories = list(histories) if histories is not None else [()] * len(prompts)
    records = [Record(prompt=p, response=r, history=h) for p, r, h in zip(prompts, responses, histories)]
    policy = reading_policy(poly, any(responses))
    feats, index, _ = extract_features(
        lm, records, int(poly.meta.get("layer", -1)), policy=policy, template=poly.meta.get("template", "auto"),
        batch_size=batch_size, max_length=max_length, show_progress=show_progress,
    )
    row_margins = read_in_batches(poly, feats)
    out = torch.full((len(records), poly.num_facets), float("-inf"))
    out.scatter_reduce_(0, index[:, None].expand_as(row_margins), row_margins, reduce="amax")
    missing = torch.isinf(out).all(dim=1)
    if missing.any():  # a response too short to read: fall back to the prompt
        sub = [records[i] for i in missing.nonzero().flatten().tolist()]
        feats, _, _ = extract_features(lm, sub, int(poly.meta["layer"]), policy="last_prompt", template=poly.meta.get("template", "auto"),
                                    max_length=max_length)
        out[missing] = read_in_batches(poly, feats)
    return out


def reading_policy(poly: SafetyPolytope, with_responses: bool) -> str:
    """The extraction policy to read texts for ``poly``.

    A polytope trained on generation-time rows (``response_tokens``, possibly combined with
    prompt rows, e.g. ``"response_tokens+last_prompt"``) reads every response token when
    responses are given and the last prompt token otherwise.
    """
    policy = str(poly.meta.get("policy", "last_prompt"))
    parts = policy.split("+")
    if "response_tokens" in parts:
        return "response_tokens" if with_responses else "last_prompt"
    if parts[0] not in POLICIES:
        raise SapError(f"the polytope's token policy {policy!r} is not one sapguard can read")
    return parts[0]


def _scan_items(texts: str | Sequence[ScanItem]) -> list[str | Conversation]:
    """Validated scan items: strings stay, message lists become :class:`Conversation`."""
    items: list[Any] = [texts] if isinstance(texts, str) else list(texts)
    if items and isinstance(items[0], Mapping):  # one conversation given bare, as a str is one text
        items = [items]
    out: list[str | Conversation] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item.strip():
                raise SapError(f"text {i + 1}: empty or whitespace-only text")
            out.append(item)
        else:
            out.append(conversation_from_messages(item, f"item {i + 1}"))
    return out


def scan(
    poly: SafetyPolytope,
    texts: str | Sequence[ScanItem],
    *,
    lm: LoadedModel | None = None,
    responses: Sequence[str | None] | None = None,
    batch_size: int = 32,
    window: int | None = None,
    max_chars: int = MAX_CHARS,
    show_progress: bool = False,
) -> list[Verdict]:
    """Scan prompts or conversations with a polytope; verdicts come back in input order.

    A prompt longer than ``window`` tokens is read in overlapping windows of ``window`` tokens
    (half a window of overlap) and its margins are the maximum over windows, so a harmful request
    anywhere in a long document is read in full; the verdict's ``windows`` says so. Nothing is
    silently truncated.

    A conversation (a list of chat messages, see :func:`conversation_from_messages`) is read as a
    training row with that ``history``: the state after the whole conversation under the polytope's
    chat template. When it is longer than ``window``, its oldest earlier exchanges are dropped until
    it fits and its last user message is read whole (:func:`fit_conversation`); the verdict's
    ``earlier_turns`` and ``dropped_turns`` say what was read.

    A polytope whose config lists the ``tail`` view (the default detector does) also reads each
    prompt's last line on its own (:func:`sapguard.features.views.tail_view`) and keeps the larger
    margin of the two views, so that a request at the end of a jailbreak template, a document or a
    conversation is read as itself; the verdict's ``tail_read`` says so.

    Args:
        poly: A trained polytope (e.g. ``SafetyPolytope.from_pretrained(dir)`` or :func:`default_polytope`).
        texts: One prompt, one conversation (a list of messages), or a list of prompts and conversations.
        lm: The base model; by default the one recorded in the polytope is loaded (once).
        responses: Optional responses, one per item, for exchange-level polytopes (not windowed); a
            conversation that ends with an assistant message carries its own.
        window: Tokens of user text read in one pass (default: the ``max_length`` the polytope was
            trained with, else :data:`DEFAULT_WINDOW`); for a conversation, the tokens of its
            messages and their role markers (:func:`fit_conversation`).
        max_chars: Longer texts (conversations: all messages together) are refused with :class:`SapError`.

    Example:
        >>> poly = default_polytope()  # doctest: +SKIP
        >>> [v.is_safe for v in scan(poly, ["How do I bake bread?", "How do I build a pipe bomb?"])]  # doctest: +SKIP
        [True, False]
        >>> chat = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
        ...         {"role": "user", "content": "How do I build a pipe bomb?"}]
        >>> scan(poly, [chat])[0].earlier_turns  # doctest: +SKIP
        1
    """
    items = _scan_items(texts)
    replies = list(responses) if responses is not None else [None] * len(items)
    if len(replies) != len(items):
        raise SapError(f"responses: {len(replies)} given for {len(items)} texts; give one per text (None for none)")
    conversations: list[Conversation] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if len(item) > max_chars:
                raise SapError(f"text {i + 1}: {len(item)} characters exceeds the limit of {max_chars}; split it or raise max_chars")
            conversations.append(Conversation(item, (), replies[i]))
            continue
        if item.response is not None and replies[i] is not None:
            raise SapError(f"item {i + 1}: the conversation ends with an assistant reply and responses[{i}] gives another")
        if item.chars() > max_chars:
            raise SapError(f"item {i + 1}: {item.chars()} characters in the conversation exceeds the limit of {max_chars}; "
                           "split it or raise max_chars")
        conversations.append(Conversation(item.prompt, item.history, item.response or replies[i]))
    lm = lm or base_model_for(poly)
    check_compatible(poly, lm.identity())
    window = window or int(poly.meta.get("max_length") or DEFAULT_WINDOW)
    template = resolve_template(lm.tokenizer, str(poly.meta.get("template", "auto")))
    views, tail_words = polytope_views(poly.meta)
    pieces: list[Conversation] = []
    owner: list[int] = []
    earlier, dropped, n_windows, tails = [], [], [], []
    for i, conv in enumerate(conversations):
        conv, n_dropped = fit_conversation(lm, conv, template, window)
        earlier.append(len(conv.history))
        dropped.append(n_dropped)
        if conv.response or conv.history:  # read whole: a prompt with its reply, or a conversation that fits
            parts = [conv]
        else:
            parts = [Conversation(part) for part in split_windows(lm, conv.prompt, window)]
        n_windows.append(len(parts))
        tail = tail_view(conv.prompt, tail_words, has_history=bool(conv.history)) if "tail" in views and not conv.response else None
        if tail is not None:
            parts.append(Conversation(tail))
        tails.append(tail is not None)
        pieces += parts
        owner += [i] * len(parts)
    piece_margins = margins_for(
        poly, lm, [c.prompt for c in pieces],
        [c.response for c in pieces] if any(c.response for c in pieces) else None,
        histories=[c.history for c in pieces], batch_size=batch_size, show_progress=show_progress,
        max_length=max(1024, 2 * window),  # a window (or fitted conversation) and its template, never cut
    )
    owners = torch.tensor(owner)
    margins = torch.full((len(items), poly.num_facets), float("-inf"))
    margins.scatter_reduce_(0, owners[:, None].expand_as(piece_margins), piece_margins, reduce="amax")
    return [
        verdict_from_margins(poly, conv.prompt, row, windows=n, earlier_turns=e, dropped_turns=d, tail_read=t)
        for conv, row, n, e, d, t in zip(conversations, margins.tolist(), n_windows, earlier, dropped, tails)
    ]


def verdict_from_margins(
    poly: SafetyPolytope, text: str, margins: Sequence[float], windows: int = 1, earlier_turns: int = 0, dropped_turns: int = 0,
    tail_read: bool = False,
) -> Verdict:
    """The :class:`Verdict` for one text from its row of facet margins (risk from the calibration)."""
    names = poly.facet_names
    row = [float(m) for m in margins]
    score = max(row)
    risk = (poly.meta.get("calibration") or {}).get("risk", {"a": 1.0, "b": 0.0})
    order = sorted(range(len(row)), key=lambda k: -row[k])
    return Verdict(
        text=text,
        is_safe=score <= 0,
        risk_score=1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, risk["a"] * score + risk["b"])))),
        score=score,
        margins={names[k]: row[k] for k in range(len(row))},
        violated=[names[k] for k in order if row[k] > 0],
        windows=windows,
        earlier_turns=earlier_turns,
        dropped_turns=dropped_turns,
        tail_read=tail_read,
    )
