"""JSONL data files that are not text: undecodable bytes and lone surrogates are refused with file and line."""
import re

import pytest

from rlhf_fast.trainers.data import load_jsonl


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "caf\xe9", "completion": "b"}\n')
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{where}:3: not UTF-8 \(byte 0xe9 at byte 16 of the line\)$"):
        load_jsonl(str(path), "sft")


def test_a_lone_surrogate_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                    '{"prompt": "a", "chosen": "ok \\ud83d", "rejected": "c"}\n', encoding="utf-8")
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"^{where}:2: field 'chosen' holds a lone surrogate \('\\ud83d' at "
                                         r"character 3\)"):
        load_jsonl(str(path), "rm")


def test_utf8_text_and_surrogate_pairs_still_load(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "café \\ud83d\\ude00", "completion": "😀"}\r\n', encoding="utf-8")
    assert load_jsonl(str(path), "sft") == [{"prompt": "café 😀", "completion": "😀"}]
