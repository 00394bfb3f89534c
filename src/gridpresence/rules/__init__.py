"""Rule-based fault detection with adaptive thresholds (second document: trigger and content
conditions, threshold adjustment, cost-per-day priority, hierarchy suppression)."""
