"""QEMU's argv from a spec and a plan: what the guest gets, and what must never be on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from boxpark.host.backends import get_backend
from boxpark.host.backends.qemu import Plan, forwarded_port, kvm_usable, qemu_args, settings
from boxpark.host.spec import Disk, MachineSpec, SpecError, host_arch


@pytest.fixture
def spec(tmp_path: Path) -> MachineSpec:
    for name in ("root.squashfs", "vmlinuz", "initrd.img", "swap.img", "data,1.img"):
        (tmp_path / name).write_bytes(bytes(1024))
    return MachineSpec(root=str(tmp_path / "root.squashfs"), kernel=str(tmp_path / "vmlinuz"),
                       initrd=str(tmp_path / "initrd.img"), state_dir=str(tmp_path / "state"), arch="amd64")


def option(args: list[str], flag: str) -> list[str]:
    """Every value given to `flag`."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == flag]


def append(args: list[str]) -> str:
    (line,) = option(args, "-append")
    return line


def test_x86_tcg_defaults(spec: MachineSpec) -> None:
    args = qemu_args(spec, Plan(binary="qemu-system-x86_64", events_port=4321, qmp_fd=7))
    assert args[0] == "qemu-system-x86_64"
    assert option(args, "-machine") == ["q35"] and option(args, "-accel") == ["tcg,tb-size=128"]  # cache: MiB
    assert "-cpu" not in args  # qemu64: measured no slower than max for this boot under TCG
    assert option(args, "-smp") == ["2"] and option(args, "-m") == ["2048M"]
    for flag in ("-nographic", "-nodefaults", "-no-reboot", "-S"):
        assert flag in args
    assert option(args, "-rtc") == ["base=utc"]
    assert option(args, "-kernel") == [spec.kernel] and option(args, "-initrd") == [spec.initrd]
    assert "socket,id=qmp,fd=7,server=on,wait=off" in option(args, "-chardev")


def test_the_guest_command_line_for_user_networking(spec: MachineSpec) -> None:
    args = qemu_args(spec, Plan(binary="q", events_port=4321, secret_file="/state/secret"))
    words = append(args).split()
    assert words[:4] == ["root=/dev/vda", "rootfstype=squashfs", "console=ttynull", "panic=-1"]
    assert "boxpark.api=tcp:0.0.0.0:1024" in words
    assert "boxpark.events=tcp:10.0.2.2:4321" in words
    assert "boxpark.secret=fwcfg:opt/boxpark/secret" in words
    assert "boxpark.net=static:10.0.2.15/24,10.0.2.2,10.0.2.3" in words
    assert option(args, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:0-:1024"]
    assert option(args, "-fw_cfg") == ["name=opt/boxpark/secret,file=/state/secret"]


def test_the_secret_is_never_on_the_command_line(spec: MachineSpec, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value-that-must-not-leak\n")
    args = qemu_args(spec, Plan(binary="q", secret_file=str(secret)))
    assert not any("s3cr3t" in arg for arg in args)


def test_console_on_and_the_log_port(spec: MachineSpec) -> None:
    spec.console = True
    args = qemu_args(spec, Plan(binary="q"))
    assert "console=hvc0" in append(args).split()
    state = spec.state_dir
    assert f"file,id=console,path={state}/console.log" in option(args, "-chardev")
    assert f"file,id=initlog,path={state}/init.log" in option(args, "-chardev")
    assert "virtserialport,chardev=initlog,bus=vser.0,name=boxpark.log" in option(args, "-device")


def test_root_first_then_extra_disks_in_order(spec: MachineSpec, tmp_path: Path) -> None:
    spec.disks = (Disk(str(tmp_path / "swap.img"), name="swap"),
                  Disk(str(tmp_path / "data,1.img"), read_only=True, format="qcow2"))
    args = qemu_args(spec, Plan(binary="q"))
    drives = option(args, "-drive")
    assert drives[0] == f"file={spec.root},if=none,id=root,format=raw,readonly=on"
    # writable: trims and written zeroes both punch holes, so the image stays sparse
    assert drives[1] == (f"file={tmp_path}/swap.img,if=none,id=swap,format=raw,readonly=off,"
                         "discard=unmap,detect-zeroes=unmap")
    # a comma in a path is doubled, QEMU's escape
    assert drives[2] == f"file={tmp_path}/data,,1.img,if=none,id=disk2,format=qcow2,readonly=on"
    blk = [d for d in option(args, "-device") if d.startswith("virtio-blk-pci")]
    assert blk == ["virtio-blk-pci,drive=root,serial=root", "virtio-blk-pci,drive=swap,serial=swap",
                   "virtio-blk-pci,drive=disk2,serial=disk2"]


def test_rtc_base_and_clock(spec: MachineSpec) -> None:
    spec.rtc_base, spec.rtc_clock = "2030-01-02T03:04:05", "vm"
    assert option(qemu_args(spec, Plan(binary="q")), "-rtc") == ["base=2030-01-02T03:04:05,clock=vm"]


def test_sizes_and_override(spec: MachineSpec) -> None:
    spec.cpus, spec.memory, spec.command_line = 1, 512, "root=/dev/vdz console=hvc0"
    args = qemu_args(spec, Plan(binary="q"))
    assert option(args, "-smp") == ["1"] and option(args, "-m") == ["512M"]
    assert append(args) == "root=/dev/vdz console=hvc0"


def test_shares_need_shared_memory_and_vhost_user(spec: MachineSpec) -> None:
    spec.memory = 1024
    args = qemu_args(spec, Plan(binary="q", share_sockets={"src": "/state/fs-src.sock"}))
    assert option(args, "-object") == []  # no shares in the spec: no shared memory
    spec.shares = {"src": "/"}
    args = qemu_args(spec, Plan(binary="q", share_sockets={"src": "/state/fs-src.sock"}))
    assert option(args, "-object") == ["memory-backend-memfd,id=mem,size=1024M,share=on"]
    assert option(args, "-numa") == ["node,memdev=mem"]
    assert "socket,id=fs0,path=/state/fs-src.sock" in option(args, "-chardev")
    assert "vhost-user-fs-pci,chardev=fs0,tag=src" in option(args, "-device")


def test_vsock_transport(spec: MachineSpec) -> None:
    args = qemu_args(spec, Plan(binary="q", transport="vsock", cid=42, events_port=5000))
    words = append(args).split()
    assert "boxpark.api=vsock:4294967295:1024" in words and "boxpark.events=vsock:2:5000" in words
    assert not any(w.startswith("boxpark.secret=") for w in words)
    assert "vhost-vsock-pci,guest-cid=42" in option(args, "-device")
    assert not any("hostfwd" in n for n in option(args, "-netdev"))


def test_arm64_uses_virt_and_cortex_a72_under_tcg(spec: MachineSpec) -> None:
    spec.arch = "arm64"
    args = qemu_args(spec, Plan(binary="qemu-system-aarch64"))
    assert option(args, "-machine") == ["virt"] and option(args, "-cpu") == ["cortex-a72"]
    kvm = qemu_args(spec, Plan(binary="qemu-system-aarch64", accel="kvm"))
    assert option(kvm, "-machine") == ["virt,gic-version=max"] and option(kvm, "-cpu") == ["host"]
    assert option(kvm, "-accel") == ["kvm"]  # no translation cache to size


def test_over_user_net_the_tcp_api_serves_only_the_hosts_forward(spec: MachineSpec) -> None:
    user = settings(spec, Plan(binary="q", transport="user"))
    assert user["api"].startswith("tcp:") and user["api_peers"] == "10.0.2.2"
    assert "api_peers" not in settings(spec, Plan(binary="q", transport="vsock", cid=3))


def test_settings_take_the_spec_net(spec: MachineSpec) -> None:
    spec.net = "dhcp"
    assert settings(spec, Plan(binary="q"))["net"] == "dhcp"


def test_forwarded_port_from_info_usernet() -> None:
    text = ("Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
            "  TCP[HOST_FORWARD]   4       127.0.0.1 46763       10.0.2.15  1024     0     0\r\n")
    assert forwarded_port(text, 1024) == 46763
    assert forwarded_port(text, 22) is None


def test_kvm_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXPARK_KVM", "1")
    assert kvm_usable("amd64") == (True, "BOXPARK_KVM=1")
    monkeypatch.setenv("BOXPARK_KVM", "0")
    assert kvm_usable("amd64")[0] is False
    monkeypatch.delenv("BOXPARK_KVM")
    other = "arm64" if host_arch() == "amd64" else "amd64"
    assert kvm_usable(other)[0] is False  # never KVM across architectures


def test_the_backend_refuses_a_kernel_of_another_arch(spec: MachineSpec) -> None:
    image = bytearray(0x400)
    image[0x38:0x3C] = b"ARM\x64"
    assert spec.kernel is not None
    Path(spec.kernel).write_bytes(image)
    backend = get_backend("qemu")
    with pytest.raises(SpecError, match="kernel: .* is built for arm64, but the machine is amd64"):
        backend.check(spec)


def test_the_balloon_with_free_page_reporting(spec: MachineSpec) -> None:
    args = qemu_args(spec, Plan(binary="q"))
    assert "virtio-balloon-pci,id=balloon,free-page-reporting=on" in option(args, "-device")
    assert get_backend("qemu").balloon == "reporting"  # the agent squeezes the cache, never holds the balloon


def test_a_fast_boot_plan_names_the_firmware_the_pvh_kernel_and_its_words(spec: MachineSpec) -> None:
    args = qemu_args(spec, Plan(binary="q", firmware="/fw/qboot.rom", kernel="/cache/pvh/k.elf",
                                kernel_args="cryptomgr.notests"))
    assert option(args, "-bios") == ["/fw/qboot.rom"]
    assert option(args, "-kernel") == ["/cache/pvh/k.elf"] and option(args, "-initrd") == [spec.initrd]
    assert "panic=-1 cryptomgr.notests" in append(args)
    plain = qemu_args(spec, Plan(binary="q"))
    assert "-bios" not in plain and option(plain, "-kernel") == [spec.kernel]
    assert "cryptomgr" not in append(plain)


def test_a_users_command_line_is_kept_whole_on_a_fast_boot(spec: MachineSpec) -> None:
    spec.command_line = "root=/dev/vda console=hvc0 init=/bin/sh"
    args = qemu_args(spec, Plan(binary="q", kernel_args="cryptomgr.notests"))
    assert append(args) == "root=/dev/vda console=hvc0 init=/bin/sh"


def test_qboot_only_for_x86_and_only_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from boxpark.host.backends import qemuargv

    monkeypatch.setattr(qemuargv, "QBOOT", "/nonexistent/qboot.rom")
    assert qemuargv.firmware("amd64") is None
    monkeypatch.setattr(qemuargv, "QBOOT", __file__)
    assert qemuargv.firmware("amd64") == __file__ and qemuargv.firmware("arm64") is None
