#!/usr/bin/env python3
"""Generate a private CA and the certificates a meshray cluster needs.

A meshray cluster trusts exactly one thing for TLS: its own CA. This script
makes that CA and, signed by it:

* ``node.pem`` / ``node-key.pem`` -- the identity every node daemon, worker
  and driver presents (server *and* client: the same process both serves
  and dials). Nodes dial each other by IP, which a shared certificate cannot
  list, so it carries the fixed DNS name ``meshray`` and channels verify
  that name (``MESHRAY_TLS_SERVER_NAME=meshray``). It also serves as the
  etcd client certificate.
* ``etcd-server.pem`` / ``etcd-server-key.pem`` -- for the etcd members
  (client and peer listeners), naming each member host.

Private keys are written mode 0600; the CA key is only needed to issue more
certificates, so keep it off the cluster machines. Needs ``cryptography``
(``pip install cryptography``); meshray itself does not.

    python scripts/gen_certs.py --out certs
    python scripts/gen_certs.py --out certs --dns node7.example.org --ip 10.0.0.7
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys

__all__ = ["CLUSTER_SERVER_NAME", "generate", "issue", "make_ca", "write_cert", "write_key"]

CLUSTER_SERVER_NAME = "meshray"
DEFAULT_ETCD_NAMES = ("etcd1", "etcd2", "etcd3")


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        sys.exit("scripts/gen_certs.py needs the 'cryptography' package: "
                 "pip install cryptography")
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _name(common_name: str):
    x509, _, _, _, _, NameOID = _crypto()
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshray"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "meshray cluster CA", days: int = 3650):
    """A self-signed CA (EC P-256: small, fast, accepted by gRPC and etcd)."""
    x509, hashes, _, ec, _, _ = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, common_name: str, *, dns: list[str] = (), ips: list[str] = (),
          days: int = 825, server: bool = True, client: bool = True):
    """A leaf certificate for `common_name`, valid for the given names/addresses."""
    x509, hashes, _, ec, ExtendedKeyUsageOID, _ = _crypto()
    if not dns and not ips:
        raise ValueError(f"certificate {common_name!r} needs at least one DNS name or IP")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    sans = [x509.DNSName(name) for name in dict.fromkeys(dns)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(ips)]
    cert = (x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_key(path: str, key) -> None:
    """PEM (PKCS#8, unencrypted: daemons start unattended), created 0600."""
    _, _, serialization, _, _, _ = _crypto()
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def write_cert(path: str, cert) -> None:
    _, _, serialization, _, _, _ = _crypto()
    with open(path, "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))


def generate(out_dir: str, *, dns: list[str] = (), ips: list[str] = (),
             etcd_names: list[str] = DEFAULT_ETCD_NAMES, days: int = 825,
             force: bool = False) -> dict[str, str]:
    """Write the CA, node and etcd certificates into `out_dir`; return their paths."""
    paths = {name: os.path.join(out_dir, f"{name}.pem") for name in (
        "ca", "ca-key", "node", "node-key", "etcd-server", "etcd-server-key")}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {existing[0]} (and {len(existing) - 1} "
                              "more); pass --force to replace the cluster's certificates")
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    ca_key, ca_cert = make_ca(days=max(days, 3650))
    local_ips = ["127.0.0.1", "::1"]
    node_key, node_cert = issue(ca_key, ca_cert, "meshray-node",
                                dns=[CLUSTER_SERVER_NAME, "localhost", *dns],
                                ips=[*local_ips, *ips], days=days)
    etcd_key, etcd_cert = issue(ca_key, ca_cert, "meshray-etcd",
                                dns=[*etcd_names, "localhost"], ips=local_ips, days=days)
    write_cert(paths["ca"], ca_cert)
    write_key(paths["ca-key"], ca_key)
    write_cert(paths["node"], node_cert)
    write_key(paths["node-key"], node_key)
    write_cert(paths["etcd-server"], etcd_cert)
    write_key(paths["etcd-server-key"], etcd_key)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="certs", help="output directory (default: certs)")
    parser.add_argument("--dns", action="append", default=[],
                        help="extra DNS name for the node certificate (repeatable)")
    parser.add_argument("--ip", action="append", default=[],
                        help="extra IP address for the node certificate (repeatable)")
    parser.add_argument("--etcd-names", default=",".join(DEFAULT_ETCD_NAMES),
                        help="comma-separated etcd member host names (default: etcd1,etcd2,etcd3)")
    parser.add_argument("--days", type=int, default=825, help="leaf validity in days")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    for ip in args.ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            parser.error(f"--ip {ip!r} is not an IP address")
    etcd_names = [n.strip() for n in args.etcd_names.split(",") if n.strip()]
    try:
        paths = generate(args.out, dns=args.dns, ips=args.ip, etcd_names=etcd_names,
                         days=args.days, force=args.force)
    except FileExistsError as exc:
        print(exc, file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name:16} {path}")
    print(f"\nNodes verify the name {CLUSTER_SERVER_NAME!r}: set "
          f"MESHRAY_TLS_SERVER_NAME={CLUSTER_SERVER_NAME}. Keep ca-key.pem off the cluster.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
