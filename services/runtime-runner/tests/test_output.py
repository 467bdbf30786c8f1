"""OutputCap: bounded memory, head and tail kept, the dropped middle counted exactly."""

from __future__ import annotations

from taskbus.runtime_runner.output import OutputCap


def test_small_output_is_kept_whole() -> None:
    cap = OutputCap(100)
    cap.append(b"hello ")
    cap.append(b"world")
    assert cap.text() == "hello world"
    assert cap.truncated_bytes == 0


def test_large_output_keeps_head_and_tail_and_counts_the_rest() -> None:
    cap = OutputCap(10)
    data = bytes(range(65, 65 + 26))  # A..Z
    for byte in data:
        cap.append(bytes([byte]))
    assert cap.total_bytes == 26
    assert cap.truncated_bytes == 16
    assert cap.text() == "ABCDE\n[... 16 bytes of output omitted ...]\nVWXYZ"


def test_one_huge_append_is_capped() -> None:
    cap = OutputCap(1024)
    cap.append(b"a" * 10_000_000 + b"END")
    text = cap.text()
    assert cap.truncated_bytes == 10_000_003 - 1024
    assert text.startswith("a" * 512)
    assert text.endswith("a" * 509 + "END")
    assert f"[... {10_000_003 - 1024} bytes of output omitted ...]" in text


def test_exactly_the_limit_is_not_truncated() -> None:
    cap = OutputCap(8)
    cap.append(b"1234")
    cap.append(b"5678")
    assert cap.text() == "12345678"
    assert not OutputCap(8)
