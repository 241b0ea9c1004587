//! A test PKI made with the openssl CLI: a CA, a server certificate for 127.0.0.1 and
//! client certificates, all signed by the CA, as files in one directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The CA (`ca.pem`, `ca.key`) and the server pair (`server.pem`, `server.key`) in `dir`.
pub struct TestPki {
    pub dir: PathBuf,
}

const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl TestPki {
    /// Makes the CA and the server certificate for 127.0.0.1 in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pki = TestPki {
            dir: dir.to_path_buf(),
        };
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(EC_KEY)
            .args(["-days", "2", "-subj", "/CN=lazysnap test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(pki.ca_key())
            .arg("-out")
            .arg(pki.ca()))?;
        pki.sign(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        Ok(pki)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The server certificate and key, as docker-registry's `tls` takes them.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }

    /// A client certificate `NAME.pem` with key `NAME.key`, for TLS client auth.
    pub fn client(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.sign(
            name,
            &format!("/CN={name}"),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        )?;
        Ok((
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        ))
    }

    fn sign(&self, name: &str, subject: &str, extensions: &str) -> anyhow::Result<()> {
        let p = |ext: &str| self.dir.join(format!("{name}.{ext}"));
        run(Command::new("openssl")
            .arg("req")
            .args(EC_KEY)
            .args(["-subj", subject, "-keyout"])
            .arg(p("key"))
            .arg("-out")
            .arg(p("csr")))?;
        std::fs::write(p("ext"), extensions)?;
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-in"])
            .arg(p("csr"))
            .arg("-CA")
            .arg(self.ca())
            .arg("-CAkey")
            .arg(self.ca_key())
            .arg("-CAcreateserial")
            .arg("-out")
            .arg(p("pem"))
            .arg("-extfile")
            .arg(p("ext")))
    }
}
