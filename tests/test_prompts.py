import json

import pytest

from rebel_diffusion.prompts import PromptSourceError, read_offline_responses, read_prompt_source


def test_text_file_jsonl_and_a_datasets_spec_on_a_local_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert read_prompt_source(tmp_path / "p.txt") == ["first", "second"]
    rows = [{"prompt": "a post\nTL;DR:", "reference": "a summary"}, {"prompt": "another"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_prompt_source(tmp_path / "p.jsonl") == ["a post\nTL;DR:", "another"]
    # `hub-id:split:column`, here with a local data file in place of the Hub id (the TL;DR configs name a Hub dataset)
    assert read_prompt_source(f"{tmp_path / 'p.jsonl'}:train:reference") == ["a summary"]
    assert read_prompt_source(f"{tmp_path / 'p.jsonl'}:train:prompt") == ["a post\nTL;DR:", "another"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2 has no string field 'prompt'"),
    ('{"prompt": "ok"}\nnot json\n', "line 2 is not JSON"),
    ("\n\n", "holds no prompts"),
])
def test_bad_jsonl_is_one_line_naming_the_problem(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(PromptSourceError, match=message):
        read_prompt_source(tmp_path / "p.jsonl", key="prompt_file")


def test_missing_source_and_missing_column(tmp_path):
    with pytest.raises(PromptSourceError, match="eval.prompt_file 'nope.txt' does not exist"):
        read_prompt_source("nope.txt", key="eval.prompt_file")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(PromptSourceError, match="no column 'query'"):
        read_prompt_source(f"{tmp_path / 'p.jsonl'}:train:query")


def test_offline_responses_from_jsonl_and_from_chat_conversations(tmp_path):
    path = tmp_path / "offline.jsonl"
    chosen = [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}]
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "1+1=", "response": "2"}, {"prompt": " 1+1= ", "response": "two"}, {"prompt": "hi?", "response": chosen},
    ]) + "\n")
    expected = {"1+1=": ["2", "two"], "hi?": ["hello"]}
    assert read_offline_responses(path, "rebel.offline_data") == expected
    # A dataset named `hub-id:split:prompt_column:response_column`, here a local data file in place of the Hub id (a
    # column holds one type: these are all conversations, as a preference set's chosen answers).
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"q": "hi?", "chosen": chosen}) + "\n")
    assert read_offline_responses(f"{chats}:train:q:chosen", "rebel.offline_data") == {"hi?": ["hello"]}


@pytest.mark.parametrize("lines, message", [
    ([{"prompt": "a"}], "line 1 needs the fields 'prompt' and 'response'"),
    ([{"prompt": "a", "response": [{"role": "user", "content": "x"}]}], "record 1: the prompt must be a string"),
    ([{"prompt": "", "response": "x"}], "holds no responses"),
])
def test_bad_offline_responses_are_one_line_naming_the_key(tmp_path, lines, message):
    path = tmp_path / "offline.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(PromptSourceError, match=message) as info:
        read_offline_responses(path, "rebel.offline_data")
    assert str(info.value).startswith("rebel.offline_data")
    with pytest.raises(PromptSourceError, match="does not exist"):
        read_offline_responses(tmp_path / "missing.jsonl", "rebel.offline_data")
