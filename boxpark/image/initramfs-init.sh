#!/bin/sh
# Boxpark initramfs /init (busybox sh, PID 1 until switch_root).
#
# Loads the boot modules (order resolved at build time), waits — bounded — for the root disk and the
# virtio console, mounts the squashfs root read-only on /newroot, moves /dev /proc /sys into it and
# switch_roots to the real init. There is no udev: devtmpfs makes the device nodes.
#
# Kernel command line keys read here:
#   root=/dev/vda           the root device (default /dev/vda)
#   rootfstype=squashfs     its filesystem (default squashfs)
#   console=hvcN            wait for /dev/hvcN too (any console= naming an hvc device)
#   boxpark.init=PATH       the program to switch_root to (default /sbin/init)
#   boxpark.rootwait=SECS   how long to wait for each device (default 10)
#   boxpark.rescue          on failure, start a shell on the console instead of powering off

/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev

# Until the console driver (a module) is loaded the kernel may have had no console to give us: then
# write to the kernel log (dmesg, and any console the kernel has). A failed redirection on `exec` would
# end this shell — and panic the kernel — so each open is tried in a subshell first.
on_console=
use_console() {
    if (: <>/dev/console) 2>/dev/null; then
        exec 0<>/dev/console 1>&0 2>&0
        on_console=1
    fi
}
use_console
[ -n "$on_console" ] || exec 0</dev/null 1>/dev/kmsg 2>&1

say() { echo "boxpark-initramfs: $*"; }

root=/dev/vda
rootfstype=squashfs
init=/sbin/init
rootwait=10
rescue=
consoles=
set -f  # no globbing of the command line's words
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
        boxpark.init=*) init="${arg#boxpark.init=}" ;;
        boxpark.rootwait=*) rootwait="${arg#boxpark.rootwait=}" ;;
        boxpark.rescue) rescue=1 ;;
        console=hvc*) c="${arg#console=}"; consoles="$consoles ${c%%,*}" ;;
    esac
done
case "$rootwait" in '' | *[!0-9]*) rootwait=10 ;; esac  # arithmetic on junk would end this shell

fail() {
    # On the console: plain lines. Without one: the kernel log at crit level, shown even with 'quiet'.
    if [ -n "$on_console" ]; then
        say "FATAL: $*"
    else
        echo "<2>boxpark-initramfs: FATAL: $*"
    fi
    if [ -n "$rescue" ] && [ -n "$on_console" ]; then
        say "boxpark.rescue: starting a shell (exit it to power off)"
        setsid cttyhack sh
    else
        say "powering off (add boxpark.rescue to the kernel command line for a shell)"
    fi
    sync
    poweroff -f
    while :; do sleep 60; done  # PID 1 must never exit: that panics the kernel
}

# wait_for PATH TEST: poll every 50 ms, for at most $rootwait seconds.
wait_for() {
    n=$((rootwait * 20))
    while ! test "$2" "$1"; do
        [ "$n" -le 0 ] && return 1
        sleep 0.05
        n=$((n - 1))
    done
}

while read -r m; do
    insmod "/lib/modules/$m.ko" || say "warning: insmod $m failed"
done </etc/boxpark/modules

for c in $consoles; do
    wait_for "/dev/$c" -c || fail "no /dev/$c after ${rootwait} s (console=$c asked for a virtio console: is a virtconsole device attached?)"
done
[ -n "$on_console" ] || use_console

wait_for "$root" -b || fail "no root device $root after ${rootwait} s (block devices: $(ls /sys/class/block | tr '\n' ' '))"
mount -t "$rootfstype" -o ro "$root" /newroot || fail "cannot mount $root ($rootfstype) on /newroot"
if [ ! -e "/newroot$init" ] && [ ! -L "/newroot$init" ]; then
    fail "the root has no $init"
fi

for d in dev proc sys; do
    mount -o move "/$d" "/newroot/$d" || fail "cannot move /$d into the root"
done

read -r up _ </newroot/proc/uptime
say "switching to $init on $root (uptime ${up} s)"
exec env -i HOME=/ TERM=linux PATH=/usr/sbin:/usr/bin:/sbin:/bin switch_root /newroot "$init"
