import json

import pytest

from rebel_diffusion.prompts import PromptSourceError, read_prompt_source


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
