"""Pull the vector selectors out of PromQL expressions (dashboard targets, alert rules).

Design notes: not a PromQL parser, a scanner that is sufficient for the expressions we write.
It blanks what cannot be a metric name (string literals outside braces, range and subquery
brackets, label lists of by/without/on/ignoring/group_*, Grafana variables), then takes each
identifier not followed by "(" and not a keyword as a metric name, with the matchers in the
braces right after it. `{...}` alone (no name) is taken as `__name__`-less and ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
    # aggregation operators: `sum by (x) (...)` puts a keyword, not "(", after the name
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
}
GRAFANA_VAR = "__grafana_var__"  # stands for $vm etc.: a matcher holding it is not checkable
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


@dataclass
class Selector:
    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)

    def __str__(self) -> str:
        inner = ",".join(f'{l}{op}"{v}"' for l, op, v in self.matchers)
        return f"{self.name}{{{inner}}}"


def selectors(expr: str) -> list[Selector]:
    """Every `name{matchers}` vector selector in one PromQL expression."""
    text = _LABEL_LIST.sub(lambda m: m.group(1), expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)                # ranges, subqueries
    text = re.sub(r"\$\{[^}]*\}|\$\w+", GRAFANA_VAR, text)  # Grafana variables
    found: list[Selector] = []
    pos = 0
    while True:
        brace_or_ident = re.compile(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|' + _IDENT.pattern)
        m = brace_or_ident.search(text, pos)
        if not m:
            return found
        pos = m.end()
        token = m.group(0)
        if token.startswith('"') or token.startswith("{"):
            continue
        rest = text[pos:].lstrip()
        if rest.startswith("(") or token in KEYWORDS or _is_number_tail(text, m.start()):
            continue
        sel = Selector(token)
        if rest.startswith("{"):
            close = text.index("}", pos)
            sel.matchers = _MATCHER.findall(text[text.index("{", pos) + 1:close])
            pos = close + 1
        found.append(sel)


def _is_number_tail(text: str, start: int) -> bool:
    """True for the unit of a duration or the exponent of a number: 5m, 1e9."""
    return start > 0 and text[start - 1].isdigit()


def grafana_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query variables."""
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query or "")
        if m:
            exprs.append(m.group(1))
    return exprs


def rule_exprs(rules: dict) -> list[str]:
    """Every expression of a Prometheus rule file (alerting and recording rules)."""
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
