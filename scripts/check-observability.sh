#!/usr/bin/env bash
# Checks the observability artefacts against SPEC §9:
#   alerts/worker-alerts.yml              promtool check rules
#   tests/alerts/worker-alerts-test.yml   promtool test rules (+ every alert has a
#                                         firing and a non-firing case)
#   dashboards/worker-observability.json  JSON, panel types, units, datasources,
#                                         $instance filters, $__rate_interval,
#                                         histogram_quantile form, PromQL syntax
#   docs/runbooks.md                      a heading for every runbook_url anchor
# and that both files use only the metric names SPEC §9 and §13.5 list (plus `up` in alerts).
#
# Usage: scripts/check-observability.sh [--names-out FILE]
#   --names-out FILE  write the metric names used by dashboard and alerts, one per
#                     line, sorted (histograms as *_bucket/_sum/_count, as they
#                     appear in a scrape; the scrape-synthesised `up` is left out),
#                     so a test can compare them with a real /metrics scrape.
# Environment: PROMTOOL (default: promtool on PATH). If promtool is missing and
# the script runs as root on Debian/Ubuntu, it installs the `prometheus` package.
# Exit status: 0 all checks pass, 1 a check failed, 2 usage or missing tools.
set -euo pipefail

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
die() { echo "check-observability: $*" >&2; exit 2; }

names_out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --names-out)
            [ $# -ge 2 ] || die "--names-out needs a file name"
            names_out="$2"; shift 2 ;;
        --names-out=*) names_out="${1#--names-out=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
# Resolve relative to the caller's directory before moving to the repo root.
if [ -n "$names_out" ] && [ "${names_out#/}" = "$names_out" ]; then
    names_out="$PWD/$names_out"
fi

cd "$(dirname "$0")/.."

ALERTS=alerts/worker-alerts.yml
ALERT_TESTS=tests/alerts/worker-alerts-test.yml
DASHBOARD=dashboards/worker-observability.json
RUNBOOKS=docs/runbooks.md
for f in "$ALERTS" "$ALERT_TESTS" "$DASHBOARD" "$RUNBOOKS"; do
    [ -f "$f" ] || { echo "check-observability: missing $f" >&2; exit 1; }
done

command -v python3 >/dev/null 2>&1 || die "python3 is required (apt-get install python3)"

PROMTOOL="${PROMTOOL:-promtool}"
if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== promtool not found: installing the 'prometheus' package (provides promtool)"
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }; then
            die "installing prometheus with apt-get failed; install promtool by hand (https://prometheus.io/download/) and retry, or set PROMTOOL=/path/to/promtool"
        fi
        PROMTOOL=promtool
    fi
    command -v "$PROMTOOL" >/dev/null 2>&1 ||
        die "promtool not found; install it (Debian/Ubuntu: apt-get install prometheus, run as root; or https://prometheus.io/download/) or set PROMTOOL=/path/to/promtool"
fi
echo "== using $("$PROMTOOL" --version 2>&1 | head -n 1)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== $PROMTOOL check rules $ALERTS"
"$PROMTOOL" check rules "$ALERTS"

echo "== $PROMTOOL test rules $ALERT_TESTS"
"$PROMTOOL" test rules "$ALERT_TESTS"

echo "== static checks (dashboard, alerts, tests, runbooks)"
python3 - "$DASHBOARD" "$ALERTS" "$ALERT_TESTS" "$RUNBOOKS" "$tmp" <<'PY'
import json, re, sys

dashboard_path, alerts_path, tests_path, runbooks_path, tmp = sys.argv[1:6]
errors = []
def err(msg):
    errors.append(msg)

# ---- metric names allowed by SPEC §9 ----------------------------------------
COUNTERS = ["worker_step_executions_total", "worker_step_errors_total",
            "worker_assignments_total", "worker_step_retries_total",
            "worker_retry_budget_denied_total", "worker_timeouts_total",
            "worker_approval_decisions_total",
            # SPEC §13.5 (NATS transport)
            "worker_nats_reconnects_total", "worker_nats_messages_total",
            "worker_jetstream_acks_total"]
HISTOGRAMS = ["worker_step_execution_duration_seconds",
              "worker_flow_execution_duration_seconds", "worker_queue_wait_seconds"]
GAUGES = ["worker_queue_depth", "worker_active_tasks", "worker_health_status",
          "worker_queue_capacity", "worker_pool_threads",
          "worker_fs_abandoned_operations", "worker_build_info",
          "worker_retries_waiting", "worker_approvals_pending",
          "worker_nats_connected", "worker_nats_publish_buffered"]
# Ours, beyond SPEC §9 (docs/SPEC.md §12.14).
COUNTERS += ["worker_step_http_errors_total"]
ALLOWED = set(COUNTERS) | set(GAUGES) | {
    h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
def allowed(name, extra=()):
    return name in ALLOWED or name.startswith("process_") or name in extra

# ---- PromQL helpers (lexical; promtool does the real parsing) ---------------
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right",
            "and", "or", "unless", "bool", "offset", "inf", "nan"}
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')

def metric_names(expr):
    """Metric names in a PromQL expression: identifiers that are not functions,
    keywords, label names, durations or numbers."""
    s = STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "{}", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in IDENT.finditer(s):
        tok = m.group(0)
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the unit of a duration or the exponent of a number
        if s[m.end():].lstrip().startswith("("):
            continue  # function or aggregation
        if tok.lower() in KEYWORDS:
            continue
        names.add(tok)
    return names

def selectors(expr, name):
    """Label-matcher bodies of every selector of `name` ('' when it has none)."""
    pat = re.compile(r"(?<![A-Za-z0-9_:])" + re.escape(name) + r"(?![A-Za-z0-9_:])(\s*\{([^}]*)\})?")
    return [m.group(2) or "" for m in pat.finditer(expr)
            if not expr[m.end():].lstrip().startswith("(")]

used_names = set()

# ---- dashboard ---------------------------------------------------------------
try:
    with open(dashboard_path, encoding="utf-8") as f:
        dash = json.load(f)
except (OSError, ValueError) as e:
    print(f"{dashboard_path}: not valid JSON: {e}", file=sys.stderr)
    sys.exit(1)

DS_UIDS = {"${datasource}", "$datasource"}
if not isinstance(dash.get("schemaVersion"), int) or dash["schemaVersion"] < 36:
    err(f"{dashboard_path}: schemaVersion should be an integer >= 36, got {dash.get('schemaVersion')!r}")
if not dash.get("uid") or not dash.get("title"):
    err(f"{dashboard_path}: uid and title are required")

variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds_var = variables.get("datasource")
if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
    err(f"{dashboard_path}: needs a template variable 'datasource' of type datasource, query prometheus")
inst_var = variables.get("instance")
if not inst_var:
    err(f"{dashboard_path}: needs a template variable 'instance'")
else:
    q = inst_var.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    if re.sub(r"\s+", "", q) != "label_values(worker_build_info,instance)":
        err(f"{dashboard_path}: variable instance: query should be label_values(worker_build_info, instance), got {q!r}")
    if not inst_var.get("multi") or not inst_var.get("includeAll"):
        err(f"{dashboard_path}: variable instance must be multi-value with 'All'")
    if (inst_var.get("datasource") or {}).get("uid") not in DS_UIDS:
        err(f"{dashboard_path}: variable instance must use the $datasource variable")
    used_names |= set(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,", q))

panels = dash.get("panels") or []
if not panels:
    err(f"{dashboard_path}: no panels")
ids, records = set(), []
for p in panels:
    where = f"{dashboard_path}: panel {p.get('id')} {p.get('title')!r}"
    if p.get("type") not in ("timeseries", "stat"):
        err(f"{where}: type {p.get('type')!r}; only timeseries and stat are allowed")
    if p.get("id") in ids or not isinstance(p.get("id"), int):
        err(f"{where}: missing or duplicate id")
    ids.add(p.get("id"))
    if not p.get("title"):
        err(f"{where}: no title")
    if not all(k in (p.get("gridPos") or {}) for k in ("x", "y", "w", "h")):
        err(f"{where}: gridPos needs x, y, w, h")
    if (p.get("datasource") or {}).get("uid") not in DS_UIDS:
        err(f"{where}: datasource must be {{type: prometheus, uid: ${{datasource}}}}")
    if not ((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit"):
        err(f"{where}: no fieldConfig.defaults.unit")
    targets = p.get("targets") or []
    if not targets:
        err(f"{where}: no targets")
    for t in targets:
        tw = f"{where} target {t.get('refId')}"
        expr = t.get("expr") or ""
        if not expr.strip():
            err(f"{tw}: empty expr")
            continue
        if "datasource" in t and (t["datasource"] or {}).get("uid") not in DS_UIDS:
            err(f"{tw}: target datasource must be ${{datasource}}")
        names = metric_names(expr)
        if not names:
            err(f"{tw}: no metric in {expr!r}")
        for n in sorted(names):
            used_names.add(n)
            if not allowed(n):
                err(f"{tw}: metric {n!r} is not in SPEC §9")
            for matchers in selectors(expr, n):
                if 'instance=~"$instance"' not in matchers.replace(" ", ""):
                    err(f"{tw}: selector of {n} lacks instance=~\"$instance\": {expr!r}")
        for rng in re.findall(r"\[([^\]]*)\]", expr):
            if rng != "$__rate_interval":
                err(f"{tw}: range [{rng}] should be [$__rate_interval]")
        if re.search(r"\b(rate|irate|increase)\s*\(", expr) and "[$__rate_interval]" not in expr:
            err(f"{tw}: rate()/increase() without [$__rate_interval]")
        for m in re.finditer(r"histogram_quantile\s*\(", expr):
            hm = re.match(r"\s*[0-9.]+\s*,\s*sum\s+by\s*\(([^)]*)\)\s*\(\s*rate\s*\(\s*\w+_bucket\b",
                          expr[m.end():])
            if not hm or "le" not in [x.strip() for x in hm.group(1).split(",")]:
                err(f"{tw}: use histogram_quantile(q, sum by (le, ...) (rate(..._bucket{{...}}[$__rate_interval]))): {expr!r}")
        concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        if "$" in concrete:
            err(f"{tw}: unknown variable in {expr!r}")
        records.append((f"dashboard_check:panel_{p.get('id')}_{t.get('refId')}", concrete))

# One recording rule per dashboard query: promtool parses them as PromQL.
with open(f"{tmp}/dashboard-queries.yml", "w", encoding="utf-8") as f:
    f.write("groups:\n  - name: dashboard-queries\n    rules:\n")
    for i, (rec, expr) in enumerate(records):
        rec = re.sub(r"[^A-Za-z0-9_:]", "_", rec) + f"_{i}"
        f.write(f"      - record: {rec}\n        expr: {json.dumps(expr)}\n")

# ---- alerts (line-based: the file is ours and regular; promtool validated it) -
with open(alerts_path, encoding="utf-8") as f:
    alert_lines = f.read().split("\n")
if any("$__" in l for l in alert_lines if not l.lstrip().startswith("#")):
    err(f"{alerts_path}: Grafana variables ($__rate_interval, ...) do not exist in Prometheus")

def block_scalar(lines, i, key_indent):
    """Lines of a YAML block scalar that starts after lines[i]."""
    out = []
    for l in lines[i + 1:]:
        if l.strip() and len(l) - len(l.lstrip()) <= key_indent:
            break
        out.append(l.strip())
    return "\n".join(out).strip()

alerts = {}   # name -> {"expr":..., "keys": set(), "runbook": ...}
current = None
for i, l in enumerate(alert_lines):
    s = l.strip()
    if s.startswith("#"):
        continue
    m = re.match(r"-?\s*alert:\s*(\S+)", s)
    if m:
        current = alerts.setdefault(m.group(1), {"expr": "", "keys": set(), "runbook": None})
        continue
    if re.match(r"-?\s*record:", s):
        current = None
        continue
    if current is None:
        continue
    m = re.match(r"(expr|severity|summary|description|runbook_url|for):\s*(.*)$", s)
    if not m:
        continue
    key, val = m.group(1), m.group(2).strip()
    current["keys"].add(key)
    if key == "expr":
        current["expr"] = block_scalar(alert_lines, i, len(l) - len(l.lstrip())) \
            if val in ("|", ">", "|-", ">-", "|+", ">+") else val.strip("'\"")
    if key == "runbook_url":
        current["runbook"] = val.strip("'\"")

if not alerts:
    err(f"{alerts_path}: no alerts found")

def github_anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")

with open(runbooks_path, encoding="utf-8") as f:
    anchors = {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", f.read(), re.M)}

# The one runbook base URL, documented in the alerts file's header comment.
RUNBOOK_BASE = "https://github.com/beamline/caf-worker/blob/main/docs/runbooks.md"
RUNBOOK_PREFIX = RUNBOOK_BASE + "#"
if not any(RUNBOOK_BASE in l for l in alert_lines if l.lstrip().startswith("#")):
    err(f"{alerts_path}: the header comment must document the runbook base URL {RUNBOOK_BASE}")
with open(runbooks_path, encoding="utf-8") as f:
    runbook_text = f.read()
if RUNBOOK_BASE not in runbook_text:
    err(f"{runbooks_path}: must document the runbook base URL {RUNBOOK_BASE}")
# Runbooks refer only to panels and codes that exist: every *italic* span is
# a dashboard panel title, every `UPPER_CASE` word in backticks that is not a
# setting is an error code of src/contract/error_code.rs.
titles = {p.get("title") for p in panels}
for m in re.finditer(r"(?<![*\w])\*([^*\n]+)\*(?![*\w])", runbook_text):
    if m.group(1) not in titles:
        err(f"{runbooks_path}: *{m.group(1)}* is not a dashboard panel title")
with open("src/contract/error_code.rs", encoding="utf-8") as f:
    codes = set(re.findall(r'= \d+, "([A-Z_]+)";', f.read()))
for code in sorted(set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`", runbook_text))):
    if code.startswith(("WORKER_", "CP2_", "RUST_")):
        continue
    if code not in codes:
        err(f"{runbooks_path}: `{code}` is neither a setting nor an error code")
for name, a in sorted(alerts.items()):
    if a["runbook"] and a["runbook"] != RUNBOOK_PREFIX + name.lower():
        err(f"{alerts_path}: {name}: runbook_url should be {RUNBOOK_PREFIX + name.lower()}")
for name, a in sorted(alerts.items()):
    where = f"{alerts_path}: {name}"
    for key in ("expr", "severity", "summary", "description", "runbook_url"):
        if key not in a["keys"]:
            err(f"{where}: no {key}")
    rb = a["runbook"] or ""
    if not rb.startswith(RUNBOOK_PREFIX):
        err(f"{where}: runbook_url should start with {RUNBOOK_PREFIX}")
    elif rb[len(RUNBOOK_PREFIX):] not in anchors:
        err(f"{where}: runbook anchor #{rb[len(RUNBOOK_PREFIX):]} has no heading in {runbooks_path}")
    for n in sorted(metric_names(a["expr"])):
        used_names.add(n)
        if not allowed(n, extra={"up"}):
            err(f"{where}: metric {n!r} is not in SPEC §9")

# ---- alert tests: one firing and one non-firing case per alert ---------------
with open(tests_path, encoding="utf-8") as f:
    test_lines = f.read().split("\n")
firing, quiet = set(), set()
pending = None
for l in test_lines:
    s = l.split("#", 1)[0].strip()
    m = re.match(r"-?\s*alertname:\s*['\"]?([A-Za-z0-9_:]+)", s)
    if m:
        pending = m.group(1)
        continue
    m = re.match(r"-?\s*exp_alerts:\s*(.*)$", s)
    if m and pending:
        (quiet if m.group(1).strip() == "[]" else firing).add(pending)
        pending = None
for name in sorted(alerts):
    if name not in firing:
        err(f"{tests_path}: no firing case for {name}")
    if name not in quiet:
        err(f"{tests_path}: no non-firing case (exp_alerts: []) for {name}")
for name in sorted((firing | quiet) - set(alerts)):
    err(f"{tests_path}: tests an unknown alert {name}")

with open(f"{tmp}/names.txt", "w", encoding="utf-8") as f:
    for n in sorted(used_names - {"up"}):
        f.write(n + "\n")

print(f"   {len(panels)} panels, {len(records)} dashboard queries, {len(alerts)} alerts, "
      f"{len(used_names - {'up'})} metric names")
if errors:
    for e in errors:
        print("ERROR: " + e, file=sys.stderr)
    sys.exit(1)
PY

echo "== $PROMTOOL check rules <dashboard queries as recording rules>"
"$PROMTOOL" check rules "$tmp/dashboard-queries.yml"

if [ -n "$names_out" ]; then
    cp "$tmp/names.txt" "$names_out"
    echo "== metric names written to $names_out ($(wc -l < "$names_out") names)"
fi
echo "== observability checks passed"
