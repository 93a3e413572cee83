//! Writes seed inputs for every fuzz target into `OUT/TARGET/` (the
//! repository keeps them in `fuzz/seeds/`) from image
//! directories made by `migrate checkpoint` (their `process.img` and page
//! stores) and messages built here from them:
//!
//!     cargo run -p ferry-fuzz-props --example seeds -- OUT IMAGE_DIR...
//!
//! `scripts/fuzz` grows the corpus `fuzz/corpus/` from them and minimizes
//! it; the seeds themselves are never minimized away.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use ferry_protocol::model::TreeImage;
use ferry_protocol::pages::{encode_batch, PageBatch, PageReader, PageRun, PageSpace};
use ferry_protocol::read_tree_image;
use ferry_protocol::wire::{
    encode_control, encode_lazy_frame, encode_page_frame, ContentHash, ControlMsg, FileFacts,
    LazyOrigin, LazyStats, MsgKind, PageSpan, ProtocolVersion, RefuseCode,
};
use ferry_transport::Fingerprint;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((out, dirs)) = args.split_first() else {
        return Err("usage: seeds OUT IMAGE_DIR...".into());
    };
    let mut n = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| -> Result<(), Box<dyn Error>> {
        let d = out.join(target);
        fs::create_dir_all(&d)?;
        fs::write(d.join(format!("seed-{name}")), bytes)?;
        n += 1;
        Ok(())
    };
    let mut frames = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        // The first image gives every kind of seed; the others (trees) only
        // their image, to keep the seeds small.
        let first = i == 0;
        let file = fs::read(dir.join("process.img"))?;
        if first {
            put("image", &format!("{i}-file"), &file)?;
        }
        put("image", &format!("{i}-payload"), &file[32..])?;
        let img = read_tree_image(dir)?;
        for (j, m) in messages(&img).iter().enumerate() {
            let f = encode_control(m)?;
            let tree = matches!(m.kind(), MsgKind::Switchover | MsgKind::PassStart);
            if first || tree {
                put(
                    "control",
                    &format!("{i}-{j}"),
                    &control_input(m.kind(), &f[16..]),
                )?;
            }
            if first && m.kind() != MsgKind::Switchover {
                frames.extend_from_slice(&f);
            }
        }
        if !first {
            continue;
        }
        for entry in fs::read_dir(dir)? {
            let p = entry?.path();
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            if !name.starts_with("pages") {
                continue;
            }
            put("page_store", &format!("{i}-{name}"), &fs::read(&p)?)?;
            for (k, b) in read_batches(&p)?.iter().enumerate() {
                let enc = encode_batch(b, 1);
                put("batch", &format!("{i}-{name}-{k}"), &enc)?;
                let pf = encode_page_frame(1, PageSpace::Task(img.tasks[0].pid), &enc)?;
                put(
                    "stream",
                    &format!("{i}-{name}-{k}-pages"),
                    &stream_input(0, &pf[16..]),
                )?;
                let lf = encode_lazy_frame(LazyOrigin::Requested, &enc)?;
                put(
                    "stream",
                    &format!("{i}-{name}-{k}-lazy"),
                    &stream_input(1, &lf[16..]),
                )?;
                if k == 0 {
                    frames.extend_from_slice(&pf);
                }
            }
        }
    }
    // Small hand-made batches: a zero run, a data run, both, stored.
    let mut b = PageBatch::default();
    b.runs.push(PageRun {
        addr: 0x1000,
        pages: 3,
        zero: true,
    });
    put("batch", "zero", &encode_batch(&b, 1))?;
    b.runs.push(PageRun {
        addr: 0x7000,
        pages: 1,
        zero: false,
    });
    b.data = (0..4096u32).map(|x| (x % 251) as u8).collect();
    put("batch", "mixed", &encode_batch(&b, 1))?;
    put("frame", "stream", &frames)?;
    let fp = |b: &[u8]| Fingerprint::of_der(b).to_string();
    let trust = format!(
        "# ferry trusted peers\n{} source host db-1\n\n  {}\t# other\n{}\n",
        fp(b"a"),
        fp(b"b").to_uppercase().replace("SHA256", "sha256"),
        fp(b"c")
    );
    put("trust", "sample", trust.as_bytes())?;
    put(
        "trust",
        "bad-line",
        format!("{}\nsha256:00 x\n", fp(b"d")).as_bytes(),
    )?;
    println!("{n} seeds in {}", out.display());
    Ok(())
}

fn control_input(kind: MsgKind, payload: &[u8]) -> Vec<u8> {
    let kinds: Vec<MsgKind> = MsgKind::ALL
        .iter()
        .copied()
        .filter(|k| k.is_control())
        .collect();
    let idx = kinds.iter().position(|k| *k == kind).unwrap_or_default();
    let mut v = vec![idx as u8];
    v.extend_from_slice(payload);
    v
}

fn stream_input(which: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![which];
    v.extend_from_slice(payload);
    v
}

fn read_batches(p: &Path) -> Result<Vec<PageBatch>, Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    fs::copy(p, dir.path().join("pages.img"))?;
    Ok(PageReader::open(dir.path())?.collect::<Result<_, _>>()?)
}

fn messages(img: &TreeImage) -> Vec<ControlMsg> {
    let version = ProtocolVersion::CURRENT;
    let root = img.tasks[0].pid;
    let exe = FileFacts {
        path: "/usr/bin/sleep".into(),
        size: 43_000,
        mtime_ns: 1_700_000_000_000_000_000,
        hash: ContentHash::Xxh3_128(0x1234_5678_9abc_def0),
    };
    let lib = FileFacts {
        path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
        size: 2_000_000,
        mtime_ns: -5,
        hash: ContentHash::Sha256([7; 32]),
    };
    let layout = img.layout();
    let span = layout.tasks[0]
        .vmas
        .iter()
        .find(|v| matches!(v.kind, ferry_protocol::model::VmaKind::Anonymous))
        .map(|v| PageSpan {
            addr: v.start,
            pages: 1,
        });
    let owed: Vec<PageSpan> = span.into_iter().collect();
    let tids: Vec<i32> = img
        .tasks
        .iter()
        .flat_map(|t| t.threads.iter().map(|th| th.tid))
        .collect();
    vec![
        ControlMsg::Hello {
            version,
            host: img.host.clone(),
            agent: "ferry 0.1.0".into(),
        },
        ControlMsg::HelloAck {
            version,
            host: img.host.clone(),
            agent: "ferry 0.1.0".into(),
        },
        ControlMsg::Prepare {
            pid: root,
            tids,
            exe,
            files: vec![lib],
        },
        ControlMsg::Ready,
        ControlMsg::Refuse {
            code: RefuseCode::PidTaken,
            reason: format!("PID {root} is in use"),
        },
        ControlMsg::PassStart {
            pass: 0,
            layout: Box::new(layout),
        },
        ControlMsg::PassEnd {
            pass: 0,
            batches: 2,
            pages: 30,
            bytes: 9000,
        },
        ControlMsg::LazyPlan { owed: owed.clone() },
        ControlMsg::Switchover {
            image: Box::new(img.clone()),
        },
        ControlMsg::Running {
            pid: root,
            restore_us: 3500,
        },
        ControlMsg::Failed {
            reason: "restore failed".into(),
        },
        ControlMsg::Done,
        ControlMsg::Abort {
            reason: "interrupted".into(),
        },
        ControlMsg::PageRequest {
            addr: owed.first().map_or(0x1000, |s| s.addr),
            pages: 1,
        },
        ControlMsg::LazyComplete {
            stats: LazyStats {
                faults: 3,
                pages_requested: 3,
                pages_pushed: 100,
                max_fault_wait_us: 800,
                last_page_us: 20_000,
            },
        },
        ControlMsg::LazyResume { pid: root },
        ControlMsg::LazyResumed { owed },
    ]
}
