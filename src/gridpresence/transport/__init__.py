"""Ways to reach the XMPP server: TCP c2s, or BOSH over HTTPS through firewalls."""
