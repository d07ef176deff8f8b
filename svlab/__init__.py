"""svlab: the svmotion lab (README, "Lab"), apart from the agent's control plane.

Three hosts: src (the agent serving VM "guest" and a QEMU guest whose disk is that export),
dst (an agent offering a datastore), mon (Prometheus scraping both). On real machines they are
Vagrant boxes provisioned by vagrant/provision.sh; on one machine, network namespaces on a
bridge (nslab.py) provisioned by that same script, with a small supervisor (supervisor.py) in
place of systemd running the units the script wrote (units.py). guest.py is the guest service.
nspawn.py boots Debian 12 machines with systemd on one host, where the tests prove what only
systemd does with those units.

The other tools that exercise the agent live here too: lab.py (the QEMU guest lab), netns.py
(hosts as network namespaces, pyroute2), writer.py (the verifying writer), demo.py (`svmotion demo`).
"""
