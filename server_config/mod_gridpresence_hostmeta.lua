-- XEP-0156: announce the BOSH endpoint at /.well-known/host-meta (XRD) and host-meta.json, so
-- a client that knows only the server's web address finds the HTTP way in through a firewall.
-- Prosody 0.12 ships no host-meta module; this one serves two small fixed documents.
-- Global, like mod_bosh: clients may address the server by IP, not only by the XMPP domain.
module:set_global();

local json = require "util.json";
local xml_escape = require "util.stanza".xml_escape;

local bosh_url = module:get_option_string("gridpresence_bosh_url");
if not bosh_url then
	module:log("warn", "gridpresence_bosh_url is not set; host-meta announces nothing");
	return;
end

local rel = "urn:xmpp:alt-connections:xbosh";
local xrd = "<?xml version='1.0' encoding='utf-8'?>\n"
	.. "<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
	.. "  <Link rel='" .. rel .. "' href='" .. xml_escape(bosh_url) .. "'/>\n"
	.. "</XRD>\n";
local jrd = json.encode({ links = { { rel = rel, href = bosh_url } } });

local function serve(body, content_type)
	return function(event)
		event.response.headers.content_type = content_type;
		event.response.headers.access_control_allow_origin = "*";
		return body;
	end
end

module:depends("http");
module:provides("http", {
	default_path = "/.well-known";
	route = {
		["GET /host-meta"] = serve(xrd, "application/xrd+xml");
		["GET /host-meta.json"] = serve(jrd, "application/json");
	};
});
