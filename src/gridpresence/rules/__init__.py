"""Rule-based fault detection with adaptive thresholds (second document: trigger and content
conditions, threshold adjustment, cost-per-day priority, hierarchy suppression). Pure: the
device runs it on itself, ``gridpresence rules replay`` on a recorded trace.
May import: protocol, words."""
