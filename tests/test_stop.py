"""Stop strings on decoded text: spanning tokens, hold-back of partial matches, release at the end."""
from engine.text.stop import TextStream
from engine.text.tokenizer import load_tokenizer

TOK = load_tokenizer("world")


def feed(text_pieces, stop):
    ids = [i for piece in text_pieces for i in TOK.encode(piece)]
    ts = TextStream(TOK.stream_decoder(), tuple(stop))
    out, stopped_at = [], None
    for n, i in enumerate(ids):
        delta, stopped = ts.push(i)
        out.append(delta)
        if stopped:
            stopped_at = n
            break
    if stopped_at is None:
        out.append(ts.finish())
    return out, stopped_at, len(ids)


def test_stop_string_spanning_two_tokens():
    out, at, _ = feed(["Hello", " wor", "ld! More"], stop=["world"])
    assert "".join(out) == "Hello "
    assert at is not None


def test_partial_match_is_held_then_released():
    ts = TextStream(TOK.stream_decoder(), ("\n\nUser:",))
    released = []
    for i in TOK.encode("Yes.\n\nUs"):
        released.append(ts.push(i)[0])
    assert "".join(released) == "Yes."               # "\n\nUs" might start the stop string
    for i in TOK.encode("ually"):
        released.append(ts.push(i)[0])
    assert "".join(released) == "Yes.\n\nUsually"


def test_no_stop_strings_releases_everything():
    out, at, _ = feed(["plain text"], stop=[])
    assert "".join(out) == "plain text" and at is None


def test_finish_releases_held_text():
    out, at, _ = feed(["ends with \n"], stop=["\n\n"])
    assert at is None and "".join(out) == "ends with \n"


def test_multibyte_characters_never_split():
    ts = TextStream(TOK.stream_decoder(), ("。",))
    ids = TOK.encode("你好世界。后面")
    text = "".join(ts.push(i)[0] for i in ids)
    assert text == "你好世界" and ts.stopped
