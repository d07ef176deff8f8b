"""svlab: the tools that exercise svmotion, apart from the agent's control plane (agent/).

lab.py: the QEMU guest lab (a small TCG guest whose disk is an svmotion export); netns.py: hosts
as network namespaces on a veth or a bridge (pyroute2); writer.py: the verifying writer (a
workload that checks what it reads back); demo.py: `svmotion demo`.
"""
