"""engine/text/chat.py: RWKV chat rendering, message normalisation, templates from goose.json."""
import pytest

from engine import InvalidRequest
from engine.text.chat import ChatTemplate, clean_message, render_chat


def test_rwkv_format_multi_turn_with_system():
    text = render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Bye\n\nAssistant:"


@pytest.mark.parametrize("raw,clean", [
    ("a\n\nb", "a\nb"), ("a\r\n\r\n\r\nb", "a\nb"), ("  x \n", "x"), ("one\ntwo", "one\ntwo"), ("a\rb", "a\nb"),
])
def test_blank_lines_inside_a_message_are_collapsed(raw, clean):
    assert clean_message(raw) == clean
    assert "\n\n" not in render_chat([{"role": "user", "content": raw}]).split("\n\nAssistant:")[0][6:]


def test_content_parts_and_developer_role():
    text = render_chat([{"role": "developer", "content": [{"type": "text", "text": "rule"}]},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": None}])
    assert text == "System: rule\n\nUser: a\nb\n\nAssistant: \n\nAssistant:"


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "function", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
])
def test_bad_messages_name_the_param(messages, param):
    with pytest.raises(InvalidRequest) as info:
        render_chat(messages)
    assert info.value.param == param


def test_template_from_goose_json():
    meta = {"chat": {"user": "Q", "assistant": "A", "system": "S", "separator": "\n\n", "generation_prompt": "A:"},
            "stop": ["\n\n", "\nQ:"]}
    t = ChatTemplate.from_metadata(meta)
    assert t.stop == ("\n\n", "\nQ:")
    assert render_chat([{"role": "user", "content": "x"}], t) == "Q: x\n\nA:"
    assert ChatTemplate.from_metadata({}) == ChatTemplate()
    with pytest.raises(ValueError, match="unknown chat keys"):
        ChatTemplate.from_metadata({"chat": {"jinja": "{{x}}"}})
    with pytest.raises(ValueError, match="stop"):
        ChatTemplate.from_metadata({"stop": "\n\n"})
