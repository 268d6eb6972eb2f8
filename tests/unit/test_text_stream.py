"""Stop strings and incremental detokenization (``octomil.engine.text_stream``)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from octomil.engine.text_stream import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    # One token per character: makes every stop-string boundary case easy to construct.
    chars = list("abcdefghijklmnopqrstuvwxyz .!XY\n")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="X"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def run(tokenizer, text, stop):
    stream = TextStream(tokenizer, stop)
    out = []
    for ch in text:
        out.append(stream.add(tokenizer.convert_tokens_to_ids(ch)))
        if stream.stopped:
            return "".join(out), True
    out.append(stream.finish())
    return "".join(out), False


def test_no_stop_passes_text_through(tokenizer):
    assert run(tokenizer, "hello world", ()) == ("hello world", False)


def test_stop_string_is_cut_and_not_emitted(tokenizer):
    assert run(tokenizer, "hello world. more", ("world",)) == ("hello ", True)


def test_partial_stop_is_held_back_then_released(tokenizer):
    stream = TextStream(tokenizer, ("wxy",))
    emitted = [stream.add(tokenizer.convert_tokens_to_ids(c)) for c in "aw"]
    assert emitted == ["a", ""]  # "w" may start "wxy"
    assert stream.add(tokenizer.convert_tokens_to_ids("b")) == "wb"


def test_earliest_of_several_stops_wins(tokenizer):
    assert run(tokenizer, "abc.def!", ("!", ".")) == ("abc", True)


def test_unfinished_stop_prefix_is_flushed_at_the_end(tokenizer):
    assert run(tokenizer, "abcwx", ("wxy",)) == ("abcwx", False)
