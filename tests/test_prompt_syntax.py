"""A1111's emphasis grammar and its 75-token chunking (imagineerd.prompt_syntax).

The parse cases are A1111's own documented examples (the docstring of ``parse_prompt_attention``
in modules/prompt_parser.py) plus its edge cases. The chunking rules are checked with a fake
tokenizer, one id per word, because the point there is where chunks are cut, not how words
become ids; one test runs the real CLIP tokenizer shipped in the package.
"""

from __future__ import annotations

import pytest

from imagineerd.errors import ValidationError
from imagineerd.prompt_syntax import (
    CHUNK_LENGTH,
    COMMA_BACKTRACK,
    Chunk,
    chunk_prompt,
    embedding_names,
    parse_attention,
)


def approx_pieces(pieces: list[tuple[str, float]]) -> list[tuple[str, object]]:
    return [(text, pytest.approx(weight)) for text, weight in pieces]


# --- parse_attention --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A1111's docstring examples, verbatim.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_documented_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == approx_pieces(expected)


def test_documented_floats_are_bit_identical() -> None:
    # A prompt copied from an A1111 PNG must weigh exactly the same, to the last bit.
    pieces = dict(parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert pieces["house"] == 1.5730000000000004
    assert pieces["sky"] == 1.4641000000000006


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("(a:1.5)", [("a", 1.5)]),
        ("(a: 1.5 )", [("a", 1.5)]),  # A1111 >= 1.6 allows spaces around the number
        ("(a:-0.5)", [("a", -0.5)]),
        ("((a:1.5))", [("a", 1.65)]),
        ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
        ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
        # Closing brackets with nothing open are literal text.
        ("a) b] c", [("a) b] c", 1.0)]),
        ("a:1.5) b", [("a:1.5) b", 1.0)]),
        ("time: 12:30", [("time: 12:30", 1.0)]),
        # Unbalanced openings close at the end: round ones first, then square ones.
        ("[a (b", [("a ", 1 / 1.1), ("b", 1.1 / 1.1)]),
        ("(a [b", [("a ", 1.1), ("b", 1.1 / 1.1)]),
        # Escapes; a backslash before any other character is dropped, as in A1111.
        ("\\\\", [("\\", 1.0)]),
        ("\\(a\\)", [("(a)", 1.0)]),
        ("(\\(a\\))", [("(a)", 1.1)]),
        ("a\\b", [("ab", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_edge_cases(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == approx_pieces(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a\nBREAK\n b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)]),
        ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        (
            "(a) BREAK (b)",
            [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.1)],
        ),
        # Only the upper-case word breaks.
        ("a break b", [("a break b", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("a BREAKS b", [("a BREAKS b", 1.0)]),
    ],
)
def test_break(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == approx_pieces(expected)


def test_break_inside_brackets_is_scaled_like_a1111() -> None:
    # A1111's marker is scaled by the brackets around it, and then no longer breaks.
    assert parse_attention("(a BREAK b)") == approx_pieces(
        [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    )


def test_weight_that_is_not_a_number_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        parse_attention("(a:1.2.3)", field="negative_prompt")
    assert info.value.field == "negative_prompt"
    assert "1.2.3" in str(info.value)


# --- chunk_prompt with a fake tokenizer -------------------------------------------------------

END = 49407
COMMA = 267


def fake_tokenize(texts: list[str]) -> list[list[int]]:
    """One id per word; ``,`` is a word of its own (id ``COMMA``)."""
    return [
        [COMMA if word == "," else 1000 + sum(map(ord, word)) for word in text.split()]
        for text in texts
    ]


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


def chunk(text: str, **kwargs) -> tuple[list[Chunk], int]:
    return chunk_prompt(text, fake_tokenize, end_id=END, comma_id=COMMA, **kwargs)


W = fake_tokenize(["w"])[0][0]
X = fake_tokenize(["x"])[0][0]


def assert_well_formed(chunks: list[Chunk]) -> None:
    for c in chunks:
        assert len(c.tokens) == CHUNK_LENGTH
        assert len(c.weights) == CHUNK_LENGTH


def test_75_tokens_fit_one_chunk() -> None:
    chunks, count = chunk(words(75))
    assert_well_formed(chunks)
    assert len(chunks) == 1
    assert chunks[0].tokens == [W] * 75
    assert count == 75


def test_76_tokens_need_two_chunks() -> None:
    chunks, count = chunk(words(76))
    assert_well_formed(chunks)
    assert len(chunks) == 2
    assert chunks[0].tokens == [W] * 75
    assert chunks[1].tokens == [W] + [END] * 74
    assert chunks[1].weights == [1.0] * 75
    assert count == 76


def test_short_prompt_is_padded() -> None:
    chunks, count = chunk("w x")
    assert len(chunks) == 1
    assert chunks[0].tokens == [W, X] + [END] * 73
    assert count == 2


def test_empty_prompt_is_one_chunk_of_padding() -> None:
    chunks, count = chunk("")
    assert len(chunks) == 1
    assert chunks[0].tokens == [END] * CHUNK_LENGTH
    assert chunks[0].weights == [1.0] * CHUNK_LENGTH
    assert chunks[0].embeddings == []
    assert count == 0


def test_comma_near_the_end_moves_the_tail_to_the_next_chunk() -> None:
    # The comma sits 10 tokens before the boundary (offset 65): the 9 words after it move.
    chunks, count = chunk(words(65) + " , " + words(9, "x") + " " + words(5))
    assert_well_formed(chunks)
    assert len(chunks) == 2
    assert chunks[0].tokens == [W] * 65 + [COMMA] + [END] * 9
    assert chunks[1].tokens == [X] * 9 + [W] * 5 + [END] * 61
    assert count == 75 + 14


def test_comma_far_from_the_end_does_not_move_anything() -> None:
    # 30 tokens before the boundary: beyond COMMA_BACKTRACK, the cut falls at 75.
    assert COMMA_BACKTRACK < 30
    chunks, _ = chunk(words(45) + " , " + words(29, "x") + " " + words(5))
    assert len(chunks) == 2
    assert chunks[0].tokens == [W] * 45 + [COMMA] + [X] * 29
    assert chunks[1].tokens == [W] * 5 + [END] * 70


def test_comma_backtrack_limit_is_inclusive() -> None:
    at_limit, _ = chunk(words(75 - COMMA_BACKTRACK) + " , " + words(30, "x"))
    assert at_limit[0].tokens[-COMMA_BACKTRACK:] == [COMMA] + [END] * (COMMA_BACKTRACK - 1)
    beyond, _ = chunk(words(74 - COMMA_BACKTRACK) + " , " + words(30, "x"))
    assert beyond[0].tokens[-1] == X


def test_no_comma_id_means_no_backtracking() -> None:
    text = words(65) + " , " + words(20, "x")
    chunks, _ = chunk_prompt(text, fake_tokenize, end_id=END, comma_id=None)
    assert chunks[0].tokens == [W] * 65 + [COMMA] + [X] * 9


def test_break_starts_a_new_chunk() -> None:
    chunks, count = chunk("w w BREAK x")
    assert_well_formed(chunks)
    assert len(chunks) == 2
    assert chunks[0].tokens == [W, W] + [END] * 73
    assert chunks[1].tokens == [X] + [END] * 74
    assert count == 75 + 1  # A1111 counts a chunk cut by BREAK as a full 75


def test_break_at_the_ends() -> None:
    leading, _ = chunk("BREAK x")
    assert [c.tokens[0] for c in leading] == [END, X]
    trailing, count = chunk("x BREAK")
    assert len(trailing) == 1
    assert count == 75


def test_weights_are_carried_per_token() -> None:
    chunks, _ = chunk("w (x:1.5) [w] w")
    assert chunks[0].tokens[:4] == [W, X, W, W]
    assert chunks[0].weights[:4] == pytest.approx([1.0, 1.5, 1 / 1.1, 1.0])
    assert chunks[0].weights[4:] == [1.0] * 71


def test_weights_move_with_the_comma_tail() -> None:
    chunks, _ = chunk(words(65) + " , (" + words(15, "x") + ":1.3)")
    assert chunks[1].tokens[:10] == [X] * 10
    assert chunks[1].weights[:10] == pytest.approx([1.3] * 10)


EMB = fake_tokenize(["emb"])[0][0]
EMB_LONG = fake_tokenize(["long"])[0][0]


def test_embedding_is_placed_with_its_vectors() -> None:
    chunks, count = chunk("w (emb:1.2) w", embeddings={(EMB,): ("emb", 3)})
    assert chunks[0].tokens[:5] == [W, 0, 0, 0, W]
    assert chunks[0].weights[:5] == pytest.approx([1.0, 1.2, 1.2, 1.2, 1.0])
    assert chunks[0].embeddings == [(1, "emb")]
    assert count == 5


def test_longest_embedding_name_wins() -> None:
    table = {(EMB,): ("emb", 1), (EMB, EMB_LONG): ("emb-long", 2)}
    chunks, _ = chunk("emb long w emb w", embeddings=table)
    assert chunks[0].tokens[:5] == [0, 0, W, 0, W]
    assert chunks[0].embeddings == [(0, "emb-long"), (3, "emb")]
    assert embedding_names(chunks) == ["emb-long", "emb"]


def test_embedding_is_not_split_across_chunks() -> None:
    # 73 words leave 2 rows; a 4-vector embedding goes whole into the next chunk.
    chunks, count = chunk(words(73) + " emb w", embeddings={(EMB,): ("emb", 4)})
    assert_well_formed(chunks)
    assert len(chunks) == 2
    assert chunks[0].tokens == [W] * 73 + [END] * 2
    assert chunks[0].embeddings == []
    assert chunks[1].tokens[:5] == [0, 0, 0, 0, W]
    assert chunks[1].embeddings == [(0, "emb")]
    assert count == 75 + 5


def test_embedding_after_a_comma_moves_with_the_tail() -> None:
    # A1111 leaves the embedding's entry behind here (its vectors would land on the padding);
    # ours moves with its placeholders.
    chunks, _ = chunk(words(60) + " , emb " + words(20), embeddings={(EMB,): ("emb", 3)})
    assert_well_formed(chunks)
    for c in chunks:
        placeholders = [i for i, token in enumerate(c.tokens) if token == 0]
        covered = [o + k for o, _name in c.embeddings for k in range(3)]
        assert placeholders == covered
    assert chunks[0].embeddings == []
    assert chunks[1].embeddings == [(0, "emb")]


def test_embedding_names_once_in_first_use_order() -> None:
    table = {(EMB,): ("emb", 2), (X,): ("ex", 1)}
    chunks, _ = chunk("x emb BREAK emb x w", embeddings=table)
    assert embedding_names(chunks) == ["ex", "emb"]
    assert embedding_names([]) == []


def test_embedding_larger_than_a_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="vectors"):
        chunk("emb", embeddings={(EMB,): ("emb", CHUNK_LENGTH + 1)})


def test_tokenize_is_called_once_with_every_piece() -> None:
    calls: list[list[str]] = []

    def tokenize(texts: list[str]) -> list[list[int]]:
        calls.append(texts)
        return fake_tokenize(texts)

    chunk_prompt("a (b) BREAK c", tokenize, end_id=END, comma_id=COMMA)
    assert calls == [["a ", "b", "", "BREAK", "c"]]


# --- the real CLIP tokenizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    from imagineerd.backends.clip_tokenizer import PAD_SD, clip_tokenizer

    return clip_tokenizer(PAD_SD)


def clip_chunks(tok, text: str) -> tuple[list[Chunk], int]:
    return chunk_prompt(
        text,
        lambda texts: tok(texts, add_special_tokens=False).input_ids,
        end_id=49407,
        comma_id=tok.convert_tokens_to_ids(",</w>"),
    )


def test_real_clip_tokenizer(clip) -> None:
    assert clip.convert_tokens_to_ids(",</w>") == COMMA

    chunks, count = clip_chunks(clip, " ".join(["fox"] * 100))
    assert len(chunks) == 2
    assert count == 100
    assert_well_formed(chunks)

    chunks, count = clip_chunks(clip, "(red:1.4) fox")
    plain = clip("red fox", add_special_tokens=False).input_ids
    assert len(plain) == 2
    assert chunks[0].tokens[:2] == plain
    assert chunks[0].tokens[2:] == [49407] * 73
    assert chunks[0].weights[:3] == pytest.approx([1.4, 1.0, 1.0])
    assert count == 2
