"""CoAP over certificate DTLS for the registrar and pledge-sim: the socket side of brski.dtls."""
