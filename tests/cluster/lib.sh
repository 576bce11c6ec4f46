# Helpers shared by the cluster scripts, the e2e suite and the operator benchmark (sourced).

# A free TCP port on loopback.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND (a function will do) until it
# succeeds; after SECONDS says what it waited for on stderr and returns 1.
wait_until() {
  local limit="$1" what="$2"; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      echo "timed out after $limit s waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
}

# The audit log's next line number: what audit_requests reads from later.
audit_mark() { echo $(($(wc -l <"$1") + 1)); }

# audit_requests LOG LINE NAMESPACE SERVICEACCOUNT: one line per request the ServiceAccount
# completed since LINE of the API server's audit log (tests/cluster/up.sh writes it):
# `verb resource[/subresource] [name]`.
audit_requests() {
  tail -n +"$2" "$1" | python3 -c '
import json, sys
user = "system:serviceaccount:" + sys.argv[1]
for event in map(json.loads, sys.stdin):
    if event["user"]["username"] != user or event["stage"] != "ResponseComplete":
        continue
    ref = event.get("objectRef", {})  # none for non-resource URLs such as /version
    resource = ref.get("resource", "") + ("/" + ref["subresource"] if "subresource" in ref else "")
    print(event["verb"], resource, ref.get("name", ""))' "$3:$4"
}
