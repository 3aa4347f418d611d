"""AUTOMATIC1111's prompt syntax: extra-network tags, emphasis, and 75-token chunks.

Extra networks (``<lora:name:0.8>``): A1111 removes every ``<kind:args>`` tag from the prompt
before the text encoder sees it and activates the networks the tags name; the stored prompt and
the PNG keep the tags, so an image is re-run as written. We act on ``lora`` (and ``lyco``,
A1111's older name for the same); a tag of another kind (a hypernetwork) is refused rather than
silently dropped.

Emphasis (``(word)``, ``[word]``, ``(word:1.3)``, ``BREAK``) and chunking (prompts longer than
CLIP's 75 tokens) follow A1111's ``prompt_parser.py`` and ``sd_hijack_clip.py`` so that a prompt
written for A1111 conditions the model the same way here. They are our own code (A1111 is
AGPL) written to its documented behaviour, and pure Python: the text encoder applies the
weights and embeddings; everything here is tested without a model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .errors import ValidationError

#: A1111's pattern for an extra-network tag (modules/extra_networks.py): ``<kind:args>``.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")

LORA_KINDS = ("lora", "lyco")


def extract_networks(prompt: str, *, field: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """``(text without tags, [(lora name, weight), ...])`` in the order written.

    ``<lora:name>`` weighs 1; ``<lora:name:w>`` weighs ``w``; A1111's third number (a
    separate UNet weight) is accepted only when it equals the first. Raises
    :class:`ValidationError` naming ``field`` for a tag we cannot honour.
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        kind, args = match.group(1), match.group(2)
        if kind.lower() not in LORA_KINDS:
            raise ValidationError(
                f"{field}: <{kind}:...> is not supported; only <lora:name:weight> tags are",
                field=field,
            )
        parts = [part.strip() for part in args.split(":")]
        name, numbers = parts[0], parts[1:]
        if not name:
            raise ValidationError(f"{field}: a <lora:...> tag has no name", field=field)
        weights = []
        for text in numbers:
            text = text.split("=", 1)[1] if "=" in text else text  # A1111's te=/unet= forms
            try:
                weights.append(float(text))
            except ValueError:
                raise ValidationError(
                    f"{field}: the weight in <lora:{name}:...> must be a number, got {text!r}",
                    field=field,
                ) from None
        if len(set(weights)) > 1:
            raise ValidationError(
                f"{field}: <lora:{name}:...> gives separate text-encoder and UNet weights; "
                "give one weight",
                field=field,
            )
        loras.append((name, weights[0] if weights else 1.0))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), loras


def combine_loras(*groups: Iterable[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """One weight per LoRA, in first-seen order: a LoRA named twice (in the ``loras`` field
    and in a tag, or in two tags) applies with the sum of its weights, as A1111 stacks them."""
    total: dict[str, float] = {}
    for group in groups:
        for name, weight in group:
            total[name] = total.get(name, 0.0) + weight
    return tuple(total.items())


# --- Emphasis: ``(word)``, ``[word]``, ``(word:1.3)`` and ``BREAK`` ---------------------------
#
# A1111 (modules/prompt_parser.py, ``parse_prompt_attention``) reads the prompt as a flat run of
# tokens rather than with a grammar, so that nothing a user types is ever a syntax error: a
# bracket that does not close is closed at the end, one that closes nothing is plain text. We
# reproduce that reading exactly (the same pieces and the same float weights, bit for bit),
# because a prompt copied from an A1111 PNG must weigh its words the same here.

#: ``(a)`` multiplies the weight of ``a`` by this; ``[a]`` divides by it.
EMPHASIS = 1.1

#: The weight ``parse_attention`` gives its ``BREAK`` marker; text never gets it unless the
#: user writes ``(BREAK:-1)``, which A1111 then also reads as a break.
BREAK_WEIGHT = -1.0

# One alternative per kind of token; every character of a prompt matches one of them, so
# ``finditer`` reads the whole text. The order within ``escape`` matters: a backslash before
# one of ``()[]\`` makes that character literal, a backslash before anything else matches
# alone and is dropped (A1111 does the same: ``a\b`` reads ``ab``). A1111 accepts spaces
# around the number of ``(word: 1.3 )`` since version 1.6.
_ATTENTION_TOKEN = re.compile(
    r"""
      (?P<escape> \\ [()\[\]\\]? )
    | (?P<weight> : \s* (?P<number> [+-]? [.\d]+ ) \s* \) )
    | (?P<open> [(\[] )
    | (?P<close> [)\]] )
    | (?P<text> [^\\()\[\]:]+ | : )
    """,
    re.VERBOSE,
)

# ``BREAK`` as a word (``\b`` on both sides, so ``a,BREAK,b`` breaks but ``BREAKFAST`` does not),
# with the whitespace around it, which would otherwise become tokens of its own.
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_attention(text: str, *, field: str = "prompt") -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``[(text, weight), ...]`` as A1111's emphasis parser does.

    ``(a)`` multiplies the weight of ``a`` by 1.1, ``[a]`` divides it by 1.1, ``(a:1.5)``
    multiplies it by 1.5; brackets nest and their factors multiply. ``\\(``, ``\\)``, ``\\[``,
    ``\\]`` and ``\\\\`` are the literal characters. A bracket left open is closed at the end of
    the text; a closing bracket (or ``:1.5)``) with nothing open to close is literal text.
    ``BREAK`` yields ``("BREAK", -1.0)``, which :func:`chunk_prompt` reads as "start a new
    chunk". Neighbouring pieces of equal weight are joined; an empty text gives
    ``[("", 1.0)]``.

    The one input A1111 fails on, a weight that is not a number (``(a:1.2.3)``), raises
    :class:`ValidationError` naming ``field``.
    """
    # Mutable [text, weight] pairs: closing a bracket scales every piece since its opening.
    pieces: list[list] = []
    open_round: list[int] = []  # index in ``pieces`` where each open "(" began
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind == "escape":
            pieces.append([token[1:], 1.0])
        elif kind == "open":
            (open_round if token == "(" else open_square).append(len(pieces))
        elif kind == "weight" and open_round:
            number = match.group("number")
            try:
                factor = float(number)
            except ValueError:
                raise ValidationError(
                    f"{field}: {number!r} in {token!r} is not a weight", field=field
                ) from None
            scale_from(open_round.pop(), factor)
        elif token == ")" and open_round:
            scale_from(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), 1 / EMPHASIS)
        else:  # plain text, or a bracket / ":w)" that closes nothing
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append(["BREAK", BREAK_WEIGHT])
                pieces.append([part, 1.0])

    # Unclosed brackets: all the round ones (outermost first), then all the square ones, the
    # order A1111 applies them in, which decides the last bits of the floats.
    for start in open_round:
        scale_from(start, EMPHASIS)
    for start in open_square:
        scale_from(start, 1 / EMPHASIS)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


# --- Chunking: prompts longer than CLIP's 75 tokens ------------------------------------------
#
# CLIP reads 77 tokens: a start token, 75 of text, an end token. A1111 (modules/sd_hijack_clip.py,
# ``tokenize_line``) lifts the limit by cutting the prompt into chunks of 75, encoding each with
# its own start and end token, and concatenating the results; we cut exactly where it cuts, so
# long prompts condition the model the same way. The encoder (torch side) adds the start and
# end tokens and applies the weights; this part stays pure Python so it is tested without a
# model.

#: Text tokens per chunk (CLIP's 77 less the start and end tokens).
CHUNK_LENGTH = 75
#: A1111's default ``comma_padding_backtrack``: when a chunk fills up, the words after its last
#: comma move to the next chunk if there are at most this many tokens from that comma to the
#: chunk's end, so that a phrase is not cut in two.
COMMA_BACKTRACK = 20
#: The token that stands in for each vector of a textual-inversion embedding (A1111's choice;
#: the encoder overwrites those rows, so the id itself is never seen).
EMBEDDING_PLACEHOLDER = 0


@dataclass
class Chunk:
    """One 75-token window of a prompt, without CLIP's start and end tokens."""

    #: Exactly ``CHUNK_LENGTH`` token ids, padded at the end with the end token.
    tokens: list[int] = dataclasses.field(default_factory=list)
    #: One multiplier per token (1.0 for padding).
    weights: list[float] = dataclasses.field(default_factory=list)
    #: ``(offset into tokens, embedding name)``: the rows from ``offset`` on that the encoder
    #: replaces with the embedding's vectors (one row per vector). The offset does not count
    #: the start token, which the encoder puts in front.
    embeddings: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _embedding_index(
    embeddings: Mapping[tuple[int, ...], tuple[str, int]],
) -> dict[int, list[tuple[tuple[int, ...], str, int]]]:
    """First token id -> the embeddings whose names start with it, longest name first, so that
    the first match found is the longest (A1111's ``EmbeddingDatabase`` sorts the same way)."""
    index: dict[int, list[tuple[tuple[int, ...], str, int]]] = {}
    for ids, (name, n_vectors) in embeddings.items():
        if not ids:
            raise ValueError(f"embedding {name!r}: its name has no tokens")
        if not 1 <= n_vectors <= CHUNK_LENGTH:
            # More vectors than a chunk holds could never be placed (A1111 builds a chunk
            # longer than CLIP can read).
            raise ValueError(
                f"embedding {name!r}: {n_vectors} vectors; a chunk holds 1 to {CHUNK_LENGTH}"
            )
        index.setdefault(ids[0], []).append((tuple(ids), name, n_vectors))
    for candidates in index.values():
        candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)
    return index


def chunk_prompt(
    text: str,
    tokenize: Callable[[list[str]], list[list[int]]],
    *,
    end_id: int,
    comma_id: int | None,
    embeddings: Mapping[tuple[int, ...], tuple[str, int]] = {},
    field: str = "prompt",
) -> tuple[list[Chunk], int]:
    """Cut a prompt into 75-token chunks as A1111's ``tokenize_line`` does.

    ``tokenize`` turns texts into token ids without start or end tokens (it is called once,
    with every piece of :func:`parse_attention`'s result); ``end_id`` pads; ``comma_id`` is the
    id of ``,`` (``None``: no comma backtracking); ``embeddings`` maps the token ids of a
    textual-inversion embedding's name to ``(name, number of vectors)``.

    Returns the chunks (at least one) and A1111's token count: 75 for every chunk but the
    last, plus the tokens actually in the last one (so an empty prompt counts 0).
    """
    pieces = parse_attention(text, field=field)
    token_lists = tokenize([piece_text for piece_text, _ in pieces])
    if len(token_lists) != len(pieces):
        raise ValueError(f"tokenize returned {len(token_lists)} lists for {len(pieces)} texts")
    index = _embedding_index(embeddings)
    vectors_of = {name: n_vectors for name, n_vectors in embeddings.values()}

    chunks: list[Chunk] = []
    current = Chunk()
    token_count = 0
    last_comma = -1  # offset of the last comma in ``current``; -1: none since the chunk began

    def finish(*, last: bool = False) -> None:
        """Pad ``current``, keep it, and start an empty one."""
        nonlocal current, token_count, last_comma
        # A1111 counts a full 75 for a chunk cut short by BREAK or a comma, but only the real
        # tokens of the last one; the count is what its UI shows as "n/75".
        token_count += len(current.tokens) if last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(current.tokens)
        current.tokens += [end_id] * padding
        current.weights += [1.0] * padding
        chunks.append(current)
        current = Chunk()
        last_comma = -1

    for ids, (piece_text, weight) in zip(token_lists, pieces, strict=True):
        if piece_text == "BREAK" and weight == BREAK_WEIGHT:
            finish()
            continue

        position = 0
        while position < len(ids):
            token = ids[position]

            if token == comma_id:
                last_comma = len(current.tokens)
            elif (
                len(current.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and CHUNK_LENGTH - last_comma <= COMMA_BACKTRACK
            ):
                # Full, and a comma close to the end: the words after it start the next chunk.
                cut = last_comma + 1
                # Never cut through an embedding's rows (possible only if its name starts with
                # a comma): it moves whole.
                for offset, name in current.embeddings:
                    if offset < cut < offset + vectors_of[name]:
                        cut = offset
                moved = Chunk(
                    tokens=current.tokens[cut:],
                    weights=current.weights[cut:],
                    # A1111 leaves these entries behind, so an embedding after the comma gets
                    # written over the old chunk's padding while its placeholders go into the
                    # new one as plain "!" tokens; we move them with their placeholders.
                    embeddings=[(o - cut, n) for o, n in current.embeddings if o >= cut],
                )
                current.tokens = current.tokens[:cut]
                current.weights = current.weights[:cut]
                current.embeddings = [(o, n) for o, n in current.embeddings if o < cut]
                finish()
                current = moved

            if len(current.tokens) == CHUNK_LENGTH:
                finish()

            match = _embedding_at(ids, position, index)
            if match is None:
                current.tokens.append(token)
                current.weights.append(weight)
                position += 1
                continue

            name_length, name, n_vectors = match
            if len(current.tokens) + n_vectors > CHUNK_LENGTH:
                finish()  # an embedding's vectors stay together in one chunk
            current.embeddings.append((len(current.tokens), name))
            current.tokens += [EMBEDDING_PLACEHOLDER] * n_vectors
            current.weights += [weight] * n_vectors
            position += name_length

    if current.tokens or not chunks:
        finish(last=True)
    return chunks, token_count


def _embedding_at(
    ids: list[int], position: int, index: dict[int, list[tuple[tuple[int, ...], str, int]]]
) -> tuple[int, str, int] | None:
    """``(name length in tokens, name, vectors)`` of the longest embedding whose name's ids
    start at ``ids[position]``, or ``None``. Names are matched within one piece of the parse,
    as in A1111: ``(my)emb`` does not name ``myemb``."""
    for name_ids, name, n_vectors in index.get(ids[position], ()):
        if tuple(ids[position : position + len(name_ids)]) == name_ids:
            return len(name_ids), name, n_vectors
    return None


def embedding_names(chunks: Iterable[Chunk]) -> list[str]:
    """The embeddings the chunks use, each once, in the order they first appear (for the
    image's metadata and for loading only what the prompt needs)."""
    return list(dict.fromkeys(name for chunk in chunks for _offset, name in chunk.embeddings))


#: A1111's prompt editing, which changes the prompt during sampling: ``[from:to:when]``,
#: ``[to:when]`` (ending in a number) and alternation ``[a|b]``. We do not do it, and read as
#: emphasis it would silently condition on other text: refused instead.
_EDITING = re.compile(
    r"(?<!\\)\[(?:[^\[\]\\]|\\.)*"  # an unescaped [ and text without brackets, then
    r"(?::\s*-?(?:\d+\.?\d*|\.\d+)\s*"  # ":when" at the end (editing), or
    r"|\|(?:[^\[\]\\]|\\.)*)\]"  # "|" alternatives
)


def refuse_prompt_editing(text: str, *, field: str = "prompt") -> None:
    """``ValidationError`` naming ``field`` for A1111 prompt editing or alternation."""
    match = _EDITING.search(text)
    if match:
        raise ValidationError(
            f"{field}: {match.group(0)[:40]!r} is A1111's prompt editing ([from:to:when] or "
            "[a|b]), which imagineerd does not do; write the prompt without it, or escape "
            "the brackets as \\[ and \\]",
            field=field,
        )
