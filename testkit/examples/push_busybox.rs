//! Builds a small busybox image from the host's /bin/busybox (Debian's busybox-static)
//! and pushes it to a plain-HTTP registry: `push_busybox HOST:PORT REPO TAG`.
//! The demo script uses it so that the demo needs nothing from outside this machine.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, repo, tag] = args.as_slice() else {
        anyhow::bail!("usage: push_busybox HOST:PORT REPO TAG");
    };
    let image = testkit::image::ImageBuilder::new()
        .layer(testkit::image::busybox_layer()?)
        .entries(&[
            testkit::image::Entry::dir("etc"),
            testkit::image::Entry::file("etc/motd", "hello from a lazysnap snapshot\n"),
        ])?
        .cmd(&["/bin/cat", "/etc/motd"])
        .build()?;
    let reference = testkit::registry::push(host, repo, tag, &image)?;
    println!("{reference}");
    Ok(())
}
