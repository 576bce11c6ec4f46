#!/usr/bin/env python3
"""Watches a pool's worker pods through a rollout and checks the operator's promise.

Reads `kubectl get pods --watch --output-watch-events -o json` on stdin (a stream of JSON
events). After every event it counts the pool's groups that are serving: every rank present,
not terminating, Ready, and all on one revision. Once all GROUPS serve it prints a "baseline"
line (start the rollout after that). From then on it fails if fewer than GROUPS - 1 groups serve (more than one group replaced at once); it succeeds when
all GROUPS groups serve on revision NEW, and fails when the stream ends before that.

Usage: watch_rollout.py GROUPS RANKS_PER_GROUP NEW_REVISION
"""

import json
import sys

GROUP = "serving.deepseek-operator.io/group"
REVISION = "serving.deepseek-operator.io/revision"


def events(stream):
    """Yields the JSON values of a stream of concatenated JSON documents."""
    decoder, buffer = json.JSONDecoder(), ""
    for line in stream:
        buffer += line
        while True:
            buffer = buffer.lstrip()
            try:
                value, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                break
            buffer = buffer[end:]
            yield value


def serving_groups(pods, ranks_per_group):
    """Group name -> revision, for the groups whose every rank is Ready on one revision."""
    by_group = {}
    for pod in pods.values():
        labels = pod["metadata"].get("labels", {})
        by_group.setdefault(labels.get(GROUP), []).append(pod)
    serving = {}
    for group, members in by_group.items():
        revisions = {p["metadata"]["labels"].get(REVISION) for p in members}
        ready = all(
            "deletionTimestamp" not in p["metadata"]
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
            for p in members
        )
        if len(members) == ranks_per_group and ready and len(revisions) == 1:
            serving[group] = revisions.pop()
    return serving


def main():
    groups, ranks_per_group = int(sys.argv[1]), int(sys.argv[2])
    pods, lowest, baseline = {}, groups, None
    for event in events(sys.stdin):
        pod = event["object"]
        if event["type"] == "DELETED":
            pods.pop(pod["metadata"]["name"], None)
        else:
            pods[pod["metadata"]["name"]] = pod
        serving = serving_groups(pods, ranks_per_group)
        revisions = set(serving.values())
        if baseline is None:
            if len(serving) == groups and len(revisions) == 1:
                baseline = revisions.pop()
                print(f"rollout: baseline: {groups} groups serve revision {baseline}", flush=True)
            continue
        lowest = min(lowest, len(serving))
        if len(serving) < groups - 1:
            print(f"rollout: only {sorted(serving)} serve: more than one group down at once")
            return 1
        if len(serving) == groups and len(revisions) == 1 and baseline not in revisions:
            print(f"rollout: all {groups} groups serve revision {revisions.pop()}; "
                  f"never fewer than {lowest} serving")
            return 0
    print("rollout: the watch ended before every group served a new revision")
    return 1


if __name__ == "__main__":
    sys.exit(main())
