"""``tqpatch chat`` on SmolLM2-135M: two scripted turns, the history kept in one compressed cache.

Unquantized, SmolLM2-135M answers "What is the population of that city?" after "What is the
capital of France?" with Paris, and with New York when asked alone; these tests check the same
at 4 bits, and that turn 2 fed only its new tokens to the model.
"""

from __future__ import annotations

import io

import pytest

import tqpatch
from tqpatch.chat import ChatSession, parse_bits, run_chat

Q1 = "What is the capital of France?"
Q2 = "What is the population of that city?"


@pytest.fixture
def smollm2_4bit(smollm2):
    model, tok = smollm2
    tqpatch.apply(model, key_bits=4, value_bits=4)
    try:
        yield model, tok
    finally:
        tqpatch.unapply(model)


def test_second_turn_attends_to_compressed_first_turn(smollm2_4bit, one_thread):
    model, tok = smollm2_4bit
    prefills = []  # (tokens fed, tokens already cached) for every forward that feeds more than 1 token

    def record(module, args, kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if ids.shape[1] > 1:
            prefills.append((ids.shape[1], int(cache.get_seq_length())))

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        session = ChatSession(model, tok, max_new_tokens=16)
        out = io.StringIO()
        turns = run_chat(session, io.StringIO(f"{Q1}\n\n{Q2}\n/quit\nnot read\n"), out)
    finally:
        hook.remove()

    assert len(turns) == 2
    first, second = turns
    assert "Paris" in first.answer
    assert "Paris" in second.answer, f"the second answer does not refer to the first turn: {second.answer!r}"

    # One cache for the whole conversation: turn 2 started from turn 1's cache and fed only the
    # uncached suffix (turn 1's last token + the template's new user turn + generation prompt).
    assert first.cached_before == 0
    turn1_len = first.context_tokens
    assert second.cached_before == turn1_len - 1  # generate never feeds the last token it produced
    assert prefills == [(first.fed_tokens, 0), (second.fed_tokens, turn1_len - 1)]
    new_turn = tok(f"<|im_start|>user\n{Q2}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert second.fed_tokens <= len(new_turn) + 3 < turn1_len

    # The streamed answers and one status line per answer went to the output stream.
    text = out.getvalue()
    assert first.answer in text and second.answer in text
    status = [line for line in text.splitlines() if line.startswith("[context ")]
    assert len(status) == 2 and f"[context {second.context_tokens} tokens" in status[1]
    assert "tqpatch K4/V4" in status[1] and "bf16 equivalent" in status[1]
    assert second.kv_bytes == tqpatch.cache_nbytes(session.cache) > 0
    hkv, d, layers = model.config.num_key_value_heads, 64, model.config.num_hidden_layers
    assert second.bf16_bytes == layers * 2 * hkv * d * 2 * second.context_tokens


def test_second_question_alone_does_not_say_paris(smollm2_4bit, one_thread):
    """The control for the test above: without turn 1 the model does not answer with Paris."""
    model, tok = smollm2_4bit
    turn = ChatSession(model, tok, max_new_tokens=16).send(Q2)
    assert turn.answer and "Paris" not in turn.answer, turn.answer


def test_parse_bits():
    assert parse_bits("4/3") == (4, 3) and parse_bits("4") == (4, 4)
    with pytest.raises(ValueError, match="K/V bits like 4/4"):
        parse_bits("four")


def test_unpatched_model_is_refused(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="tqpatch.apply"):
        ChatSession(model, tok)


def test_status_line_formats():
    from tqpatch.chat import TurnResult, format_status

    line = format_status(TurnResult("a", 0, 10, 10, 2**20, 1100, 2**21, 2**22), "tqpatch K4/V4")
    assert line.startswith("[context 10 tokens | K/V 1.00 MiB (tqpatch K4/V4, measured; room for 1100 tokens)")
    assert "bf16 equivalent: 2.00 MiB for 10 tokens, 4.00 MiB for 1100]" in line


def test_cli_chat_command(monkeypatch, capsys, one_thread):
    """``tqpatch chat`` end to end on scripted stdin: streamed answer, status line, /quit."""
    from tqpatch import cli

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{Q1}\n/quit\n"))
    rc = cli.main(["chat", "smollm2-135m", "--bits", "4/4", "--max-new-tokens", "12", "--dtype", "float32",
                   "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Paris" in out
    status = [line for line in out.splitlines() if line.startswith("[context ")]
    assert len(status) == 1 and "tqpatch K4/V4" in status[0] and "bf16 equivalent" in status[0]
