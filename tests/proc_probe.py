"""What a process of the served tree may do with its /proc, as a script to run inside the tree's
namespaces: write a host-wide kernel setting (its own value back: harmless if it went through),
read /proc/keys, and whose PIDs /proc shows. Printed as one JSON object. Used by the unit test of
nsinit (namespaces made by the test) and by the e2e test (a restored container's tree)."""

SCRIPT = r"""
import errno, json, os
out = {"pid": os.getpid(), "own": os.readlink("/proc/self")}
value = open("/proc/sys/vm/swappiness").read()
try:
    open("/proc/sys/vm/swappiness", "w").write(value)
    out["sysctl"] = "written"
except OSError as e:
    out["sysctl"] = errno.errorcode[e.errno]
out["keys"] = open("/proc/keys").read() if os.path.exists("/proc/keys") else ""
out["mounts"] = [l.split()[4] for l in open("/proc/self/mountinfo")]
if os.path.exists("/proc/driver/version"):
    out["driver"] = sorted(os.listdir("/proc/driver"))
    out["version"] = open("/proc/driver/version").read()
print(json.dumps(out))
"""
