import open_clip
import pytest

from rebel_diffusion.tokenizer import build_clip_tokenizer


@pytest.mark.parametrize("text", ["a red circle on a white background", "A Photo of a Hedgehog, 4k!", "kangaroo"])
def test_matches_open_clips_tokenizer(tmp_path, text):
    tokenizer = build_clip_tokenizer(tmp_path / "tok")
    ours = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize([text])[0].tolist()
    # open_clip pads with 0, Stable Diffusion's tokenizer with <|endoftext|>; the real tokens must agree.
    length = ours.index(tokenizer.eos_token_id) + 1
    assert ours[:length] == reference[:length]
    assert len(tokenizer) == 49408 and tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407


def test_is_written_once_and_reloaded(tmp_path):
    first = build_clip_tokenizer(tmp_path / "tok", model_max_length=16)
    (tmp_path / "tok" / "merges.txt").touch()
    second = build_clip_tokenizer(tmp_path / "tok")
    assert second.model_max_length == 16 and second("a cat").input_ids == first("a cat").input_ids
