"""The randomized fault campaign (issue 10): `python -m faults`, `make faults`.

Each trial builds a VM of 1-4 small disks served by a real `svmotion agent` (and its nbdkit with
the real plugin), runs fio (`--verify=crc32c`, an independent verifier) and the project's
VerifyingWriter through the VM's NBD socket, migrates with a random stun strategy, mirror mode and
copy rate, and fires ONE random fault at a random moment: agent SIGKILL, nbdkit SIGKILL, the
destination failing writes (EIO), the destination full, or the agent hung under a stun. Then it
checks the invariants (checks.py), migrates once more without a fault and checks again.

Modules: params (a trial from its seed), trial (the steps), inject (the fault), dest (the
destinations), fio (the independent verifier), checks (the invariants), report (results and
summary), resources (cleanup), selftest (the verifiers catch a lost write), __main__ (the CLI).
"""
