# Lab guest job: load the kernel's nbd module, then run netlink_job.py with the guest's Python.
modprobe nbd || { echo "NBD-MODULE-MISSING"; exit 20; }
[ -x /py/usr/bin/python3 ] || { echo "NO-PYROOT"; exit 21; }
chroot /py /usr/bin/python3 /job/netlink_job.py
rc=$?
echo "DEAD-CONNECTION-EVENTS $(dmesg | grep -ci 'dead connection')"
# The host kills nbdkit once on purpose, so "Receive control failed" / "Dead connection" lines
# are expected; what must never appear is an IO error handed to a user, or a request timeout.
if dmesg | grep -iE 'I/O error|timed out'; then
  echo "GUEST-IO-ERRORS"
  exit 22
fi
exit $rc
