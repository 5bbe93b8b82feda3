"""The companion BRSKI registrar (RFC 8995) with its domain CA, and a MASA.

Two services, each a console script with a TOML configuration:

* ``brski-registrar`` (``registrar.cli``; keys in ``registrar.config``): BRSKI
  requestvoucher/voucher_status/enrollstatus and EST over HTTPS, GRASP and mDNS announcements;
* ``brski-masa`` (``registrar.masa_cli``; keys in ``registrar.masa_config``): vouchers and the
  audit log.

For labs and tests, ``lab.registrar_setup.write_configs`` (source tree only, not packaged)
makes both configurations from a ``brski-pki`` directory.
Wire formats come from ``brski``; state is kept by ``registrar.store`` (SQLite).
"""
