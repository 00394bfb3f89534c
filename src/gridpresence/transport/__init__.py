"""Ways to reach the grid: TCP c2s, or BOSH over HTTPS through firewalls, and grid payloads as
mail over SMTP for parties without presence; one TLS trust (the grid's CA) for all of them.
May import: protocol, words, security, rules, config, physics."""
