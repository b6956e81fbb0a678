"""The host's data-disk decisions before boot (`initphase.prepare_data_disk`): create, record, never shrink.

Only the host's files are involved (a state directory and an image file under tmp_path); what happens after
Ready — growing the image online or by a reboot, the guest's filesystem — runs for real in tests/vm/test_disk.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boxpark.host import initphase
from boxpark.host.config import loads
from boxpark.host.state import Machine

MiB = 1024 * 1024


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    m = Machine.named("t", home=tmp_path)
    m.ensure()
    return m


def prepare(machine: Machine, size: str) -> initphase.DiskPlan:
    plan = initphase.prepare_data_disk(machine, loads(f'[disk]\nsize = "{size}"\n'))
    assert plan is not None
    return plan


def image(machine: Machine, size: int) -> None:
    with open(machine.data_disk, "wb") as f:
        f.truncate(size)


def record(machine: Machine) -> dict[str, object] | None:
    return machine.read_json(machine.pending_resize_file)  # type: ignore[no-any-return]


def test_a_new_disk_is_made_at_its_size_with_nothing_pending(machine: Machine) -> None:
    plan = prepare(machine, "128MiB")
    assert plan.new and not plan.resize_pending and plan.size == 128 * MiB
    assert machine.data_disk.stat().st_size == 128 * MiB
    assert record(machine) is None


def test_a_size_that_is_no_whole_sector_is_rounded_up(machine: Machine) -> None:
    plan = prepare(machine, str(128 * MiB + 1))
    assert plan.size == 128 * MiB + 512 == machine.data_disk.stat().st_size


def test_a_larger_size_is_recorded_before_the_image_grows(machine: Machine) -> None:
    image(machine, 128 * MiB)
    plan = prepare(machine, "256MiB")
    assert not plan.new and plan.resize_pending and plan.size == 256 * MiB and not plan.note
    assert record(machine) == {"path": str(machine.data_disk), "size": 256 * MiB, "from": 128 * MiB}
    # the image grows after Ready (online, or before a reboot): an agent killed now has changed nothing
    assert machine.data_disk.stat().st_size == 128 * MiB


def test_a_smaller_size_never_shrinks_the_disk_and_says_so(machine: Machine) -> None:
    image(machine, 256 * MiB)
    plan = prepare(machine, "128MiB")
    assert not plan.resize_pending and plan.size == 256 * MiB
    assert plan.note == "the data disk stays at 256 MiB: disk.size is 128 MiB, and a disk is never shrunk"
    assert machine.data_disk.stat().st_size == 256 * MiB and record(machine) is None


def test_a_pending_size_larger_than_the_config_is_finished_not_undone(machine: Machine) -> None:
    image(machine, 128 * MiB)
    prepare(machine, "512MiB")  # then the agent dies, and the user lowers disk.size again
    plan = prepare(machine, "256MiB")
    assert plan.resize_pending and plan.size == 512 * MiB and "never shrunk" in plan.note
    assert record(machine) == {"path": str(machine.data_disk), "size": 512 * MiB, "from": 128 * MiB}


def test_an_image_grown_before_the_kill_still_gets_its_filesystem_grown(machine: Machine) -> None:
    image(machine, 128 * MiB)
    prepare(machine, "256MiB")
    image(machine, 256 * MiB)  # the agent grew the file, then was killed before the guest's resize2fs
    plan = prepare(machine, "256MiB")
    assert plan.resize_pending and plan.size == 256 * MiB and not plan.note
    assert record(machine)["size"] == 256 * MiB  # type: ignore[index]


def test_a_record_for_another_image_or_unreadable_is_ignored(machine: Machine) -> None:
    image(machine, 128 * MiB)
    machine.write_json(machine.pending_resize_file, {"path": "/elsewhere.img", "size": 1 << 40})
    assert not prepare(machine, "128MiB").resize_pending
    machine.pending_resize_file.write_text("{not json")
    assert not prepare(machine, "128MiB").resize_pending
    machine.pending_resize_file.write_text(json.dumps({"path": str(machine.data_disk), "size": "big"}))
    assert not prepare(machine, "128MiB").resize_pending
    assert machine.data_disk.stat().st_size == 128 * MiB


def test_no_disk_size_means_no_data_disk(machine: Machine) -> None:
    assert initphase.prepare_data_disk(machine, loads('[disk]\nsize = "0"\n')) is None
    assert not machine.data_disk.exists()


def test_share_sources_are_virtiofs_tags_or_the_sandboxs_bound_directories(tmp_path: Path) -> None:
    """How the guest mounts each share of the spec: a VM's virtiofs device by tag; in the sandbox the
    directory its preinit bound by tag under /run/boxpark/shares."""
    from boxpark.host.spec import MachineSpec

    spec = MachineSpec(root=str(tmp_path / "root.squashfs"), state_dir=str(tmp_path), kernel=None,
                       shares={"share0": "/src", "share1": "/home/u"},
                       share_targets={"/src": "share0", "/home/u": "share1"})
    assert initphase.share_sources(spec, binds=False) == {"/src": ("share0", "virtiofs", []),
                                                          "/home/u": ("share1", "virtiofs", [])}
    assert initphase.share_sources(spec, binds=True) == {
        "/src": ("/run/boxpark/shares/share0", "", ["bind"]),
        "/home/u": ("/run/boxpark/shares/share1", "", ["bind"])}


def test_the_data_disk_is_mounted_to_trim_only_where_its_device_takes_discards() -> None:
    assert initphase.mount_options(4 << 30) == ["noatime", "discard"]
    assert initphase.mount_options(0) == ["noatime"]  # ext4 would warn and trim nothing
