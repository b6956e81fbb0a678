"""`boxpark status`'s lines for what a machine costs: guest memory, the VM process's RSS, the data disk."""

from __future__ import annotations

from boxpark.cli.machine import resource_lines, size_text

GIB = 1 << 30
MIB = 1 << 20


def test_sizes_are_for_people() -> None:
    assert [size_text(n) for n in (0, 512, 1536, 3 * MIB // 2, 20 * GIB, 3000 * GIB)] == \
        ["0 B", "512 B", "1.5 KiB", "1.5 MiB", "20.0 GiB", "3000.0 GiB"]


def test_every_figure_the_agent_read_is_shown() -> None:
    lines = resource_lines({
        "guest_memory": {"total": 2 * GIB, "used": 300 * MIB, "available": 1700 * MIB, "cached": 0,
                         "balloon": None},
        "vm_rss": 650 * MIB,
        "data_disk": {"size": 20 * GIB, "allocated": 1536 * MIB}})
    assert lines == ["memory: 300.0 MiB used, 1.7 GiB available of 2.0 GiB in the guest",
                     "VM process: 650.0 MiB resident on the host",
                     "data disk: 20.0 GiB, 1.5 GiB allocated on the host"]


def test_a_balloon_that_took_memory_back_is_said() -> None:
    lines = resource_lines({"guest_memory": {"total": 2 * GIB, "used": MIB, "available": GIB, "balloon": GIB},
                            "vm_rss": None, "data_disk": None})
    assert lines == ["memory: 1.0 MiB used, 1.0 GiB available of 2.0 GiB in the guest, "
                     "1.0 GiB given back by the balloon"]


def test_what_could_not_be_read_is_left_out_or_unknown() -> None:
    nothing = {"guest_memory": None, "vm_rss": None, "data_disk": None}
    assert resource_lines(nothing) == ["memory: the guest's figures are unknown (it did not answer in time)"]
    assert resource_lines(nothing, ready=False) == []
    assert resource_lines(None) == []  # an agent from before these figures
