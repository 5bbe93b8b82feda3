"""The CoAPS pledge's command-line choices, apart from its code: ``pledge-sim`` builds its
parser from them without importing aiocoap and the DTLS stack, which an HTTPS run never uses
(their import was a tenth of a 150-pledge run's CPU)."""

QUERY = "brski-jp=*"
# --core-query: the current form, and the one deployed pledges of older drafts send
QUERIES = {"brski-jp": QUERY, "rt": "rt=brski.jp"}
# RFC 7959 block sizes a pledge may ask for: 16 .. 1024 bytes.
BLOCK_SIZES = tuple(2 ** (szx + 4) for szx in range(7))
