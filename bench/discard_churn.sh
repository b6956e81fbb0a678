# Docker-like churn on the data disk, for the `discard` against periodic `fstrim` measurement in
# docs/backends.md ("Disk back to the host"). Not a `python -m bench` module: run it in a qemu machine's
# guest, alternating the modes, a warm-up run first (it makes the seed tar):
#   boxpark exec --name NAME -- sh -c "$(cat bench/discard_churn.sh)" sh fstrim     # or: discard
# One run: a tar of the guest's /usr extracted twice (a layer pulled) and a 256 MiB blob written, synced; then
# all deleted, synced (an image removed); `fstrim` mode then trims once. Guest CPU is user+nice+system+irq+
# softirq jiffies of /proc/stat (USER_HZ 100). It remounts the data disk with `discard` or `nodiscard`: end
# with a `discard` run (what `up` mounts), and remove /var/lib/boxpark/seed.tar after.
set -e
mode=$1
cd /var/lib/boxpark
if [ "$mode" = discard ]; then mount -o remount,discard /var/lib/boxpark; else mount -o remount,nodiscard /var/lib/boxpark; fi
[ -f seed.tar ] || { tar -C / -cf seed.tar usr/lib usr/share usr/bin 2>/dev/null || true; }
cpu() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
c0=$(cpu); t0=$(ms)
mkdir -p l1 l2; tar -C l1 -xf seed.tar; tar -C l2 -xf seed.tar; yes blob | head -c 268435456 > blob; sync
c1=$(cpu); t1=$(ms)
rm -rf l1 l2 blob; sync
c2=$(cpu); t2=$(ms)
ft=0; fc=0
if [ "$mode" = fstrim ]; then
  fstrim /var/lib/boxpark; c3=$(cpu); t3=$(ms); fc=$((c3 - c2)); ft=$((t3 - t2))
fi
echo "mode=$mode seed_mib=$(( $(stat -c %s seed.tar) >> 20 )) write_ms=$((t1 - t0)) write_cpu=$((c1 - c0)) delete_ms=$((t2 - t1)) delete_cpu=$((c2 - c1)) fstrim_ms=$ft fstrim_cpu=$fc"
