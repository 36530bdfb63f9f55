# The one image every component runs from: istiod-lite, ztunnel, ztunnel-node-agent and
# waypoint are its console scripts, which the manifests `ambientctl install` prints name as
# each container's command.
#
#   docker build -t ambient-mesh:latest .
FROM python:3.11-slim

# nft and ip: the node agent writes the capture rules inside each enrolled pod's netns.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN pip install --no-cache-dir /src && rm -rf /src

# istiod-lite and waypoints run unprivileged; the manifests run ztunnel and its node agent
# as root, for the capabilities they need.
USER 1337:1337
