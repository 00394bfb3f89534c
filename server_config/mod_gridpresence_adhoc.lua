-- XEP-0050 ad-hoc commands at a device's BARE JID. Gajim and poezio ask the bare JID for the
-- command list (disco#items node='http://jabber.org/protocol/commands', XEP-0050 §2.2) and
-- execute there too; Prosody would answer that itself (item-not-found). For the accounts named
-- in gridpresence_adhoc_accounts (the fleet's devices), such an IQ is passed to the account's
-- connected resource, and its answer goes back to the requester as the answer of the bare JID
-- it asked (same id, from = that bare JID), since clients match the reply's from against it.
-- No resource online: service-unavailable. No answer in time: remote-server-timeout.
if module:get_host_type() ~= "local" then return end

local st = require "util.stanza";
local jid = require "util.jid";
local new_id = require "util.id".medium;

local COMMANDS = "http://jabber.org/protocol/commands";
local devices = module:get_option_set("gridpresence_adhoc_accounts", {});
local timeout = module:get_option_number("gridpresence_adhoc_timeout", 30);
local bare_sessions = prosody.bare_sessions;

-- Our id of a forwarded IQ -> { stanza = the requester's IQ, device = the full JID it went to }.
local pending = {};

-- The resource that takes the IQ: the most available one, else any bound one (no presence yet).
local function device_session(bare)
	local user = bare_sessions[bare];
	if not user then return nil; end
	if user.top_resources and user.top_resources[1] then return user.top_resources[1]; end
	local _, session = next(user.sessions or {});
	return session;
end

local function give_up(id, condition, text)
	local p = pending[id];
	if not p then return; end
	pending[id] = nil;
	module:send(st.error_reply(p.stanza, condition == "service-unavailable" and "cancel" or "wait", condition, text));
end

local function forward(event)
	local origin, stanza = event.origin, event.stanza;
	local node, host = jid.prepped_split(stanza.attr.to);
	if not (node and host == module.host and devices:contains(node)) then return nil; end
	local session = device_session(node .. "@" .. host);
	if not session then
		origin.send(st.error_reply(stanza, "cancel", "service-unavailable", "the device is not connected"));
		return true;
	end
	local id = new_id();
	local copy = st.clone(stanza);
	copy.attr.id, copy.attr.to = id, session.full_jid;
	copy.attr.from = stanza.attr.from or origin.full_jid;
	pending[id] = { stanza = st.clone(stanza), device = session.full_jid, requester = copy.attr.from };
	pending[id].stanza.attr.from = copy.attr.from;
	module:add_timer(timeout, function() give_up(id, "remote-server-timeout", "the device did not answer"); end);
	session.send(copy);
	return true;
end

local function forward_commands_node(event)
	local query = event.stanza.tags[1];
	if event.stanza.attr.type ~= "get" or query.attr.node ~= COMMANDS then return nil; end
	return forward(event);
end

local function forward_command(event)
	if event.stanza.attr.type ~= "set" then return nil; end
	return forward(event);
end

module:hook("iq/bare/http://jabber.org/protocol/disco#items:query", forward_commands_node, 10);
module:hook("iq/bare/http://jabber.org/protocol/disco#info:query", forward_commands_node, 10);
module:hook("iq/bare/" .. COMMANDS .. ":command", forward_command, 10);

-- The device's answer: to the requester, as the bare JID's answer to the id it sent.
module:hook("iq/full", function(event)
	local stanza = event.stanza;
	local p = pending[stanza.attr.id];
	if not p or (stanza.attr.type ~= "result" and stanza.attr.type ~= "error")
		or stanza.attr.from ~= p.device or stanza.attr.to ~= p.requester then
		return nil;
	end
	pending[stanza.attr.id] = nil;
	stanza.attr.id, stanza.attr.from = p.stanza.attr.id, p.stanza.attr.to;
	return nil; -- mod_iq delivers it to the requester as usual
end, 10);

-- A device that goes away before answering: the requester hears it now, not at the time-out.
module:hook("resource-unbind", function(event)
	local gone = event.session.full_jid;
	for id, p in pairs(pending) do
		if p.device == gone then give_up(id, "service-unavailable", "the device disconnected"); end
	end
end);
