//! Checks every struct size, field offset, field size, constant and ioctl
//! number of xen-sys against the Linux uapi headers (`/usr/include/xen/`).
//!
//! A small C program, generated from the table below and compiled with `gcc`
//! against the headers, prints each item as `name=value`; the test compares
//! them with what rustc computed for the Rust definitions. A wrong Rust field
//! cannot slip through: it changes its own size or offset, or the offsets of
//! the fields after it, or the struct's size; and since every ioctl number
//! encodes `sizeof` of its argument (`_IOC(dir, type, nr, size)`) and
//! `xen_sys::ioctl` computes them from `size_of` of the Rust structs, the
//! number changes with it, which the kernel would reject with `ENOTTY`.
//!
//! Missing `gcc` or headers fail the test (CI installs `gcc` and
//! `linux-libc-dev`): skipping would let the ABI go unchecked.
//!
//! `<xen/privcmd.h>` includes `<xen/interface/xen.h>`, which Debian's
//! linux-libc-dev does not ship (checked: the include fails). Rather than
//! copy the privcmd structs by hand, the test writes a stub of that header
//! into its temp dir, defining just the two types privcmd.h uses from it
//! (`domid_t`, `xen_pfn_t`, which is 64 bits on x86_64 and arm64), and puts
//! the dir first on the include path, so the real header text is compiled.

use std::collections::HashMap;
use std::fs;
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use xen_sys::dm_op::*;
use xen_sys::evtchn::*;
use xen_sys::gntalloc::*;
use xen_sys::gntdev::*;
use xen_sys::ioctl::*;
use xen_sys::ioreq::*;
use xen_sys::privcmd::*;
use xen_sys::xenbus::*;

/// `(name, C expression, value in Rust)`.
type Item = (&'static str, &'static str, u64);

/// Size of the field a projection closure points at.
fn field_size<T, F>(_: fn(*const T) -> *const F) -> u64 {
    size_of::<F>() as u64
}

/// `sizeof` of a C struct and of its Rust mirror.
macro_rules! sizeof {
    ($c:literal, $r:ty) => {
        (
            concat!("sizeof ", $c),
            concat!("sizeof(struct ", $c, ")"),
            size_of::<$r>() as u64,
        )
    };
}

/// Offset and size of a C field (dotted path) and of its Rust mirror.
macro_rules! field {
    ($c:literal . $cf:literal, $r:ty, $($rf:ident).+) => {[
        (
            concat!("offsetof ", $c, ".", $cf),
            concat!("offsetof(struct ", $c, ", ", $cf, ")"),
            offset_of!($r, $($rf).+) as u64,
        ),
        (
            concat!("sizeof ", $c, ".", $cf),
            concat!("sizeof(((struct ", $c, " *)0)->", $cf, ")"),
            // SAFETY: only the address of the field is taken (`&raw const`),
            // nothing is read; the closure is never called on a bad pointer.
            field_size(|p: *const $r| unsafe { &raw const (*p).$($rf).+ }),
        ),
    ]};
}

/// A C macro or constant and the Rust constant of the same name.
macro_rules! constant {
    ($name:ident) => {
        (stringify!($name), stringify!($name), $name as u64)
    };
    ($name:ident, $c:literal) => {
        (stringify!($name), $c, $name as u64)
    };
}

fn items() -> Vec<Item> {
    let mut v: Vec<Item> = vec![
        constant!(IOCTL_PRIVCMD_MMAPBATCH_V2),
        constant!(IOCTL_PRIVCMD_MMAP_RESOURCE),
        constant!(IOCTL_PRIVCMD_DM_OP),
        constant!(IOCTL_EVTCHN_BIND_INTERDOMAIN),
        constant!(IOCTL_EVTCHN_UNBIND),
        constant!(IOCTL_EVTCHN_NOTIFY),
        constant!(IOCTL_GNTDEV_MAP_GRANT_REF),
        constant!(IOCTL_GNTDEV_UNMAP_GRANT_REF),
        constant!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY),
        constant!(IOCTL_GNTDEV_GRANT_COPY),
        constant!(IOCTL_GNTALLOC_ALLOC_GREF),
        constant!(IOCTL_GNTALLOC_DEALLOC_GREF),
        constant!(GNTALLOC_FLAG_WRITABLE),
        constant!(UNMAP_NOTIFY_CLEAR_BYTE),
        constant!(UNMAP_NOTIFY_SEND_EVENT),
        sizeof!("privcmd_mmapbatch_v2", PrivcmdMmapbatchV2),
        sizeof!("privcmd_mmap_resource", PrivcmdMmapResource),
        sizeof!("privcmd_dm_op_buf", PrivcmdDmOpBuf),
        sizeof!("privcmd_dm_op", PrivcmdDmOp),
        sizeof!("ioctl_evtchn_bind_interdomain", IoctlEvtchnBindInterdomain),
        sizeof!("ioctl_evtchn_unbind", IoctlEvtchnUnbind),
        sizeof!("ioctl_evtchn_notify", IoctlEvtchnNotify),
        sizeof!("ioctl_gntdev_grant_ref", IoctlGntdevGrantRef),
        sizeof!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef),
        sizeof!("ioctl_gntdev_unmap_grant_ref", IoctlGntdevUnmapGrantRef),
        sizeof!("ioctl_gntdev_unmap_notify", IoctlGntdevUnmapNotify),
        sizeof!("gntdev_grant_copy_segment", GntdevGrantCopySegment),
        sizeof!("ioctl_gntdev_grant_copy", IoctlGntdevGrantCopy),
        sizeof!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref),
        sizeof!("ioctl_gntalloc_dealloc_gref", IoctlGntallocDeallocGref),
    ];
    let fields = [
        field!("privcmd_mmapbatch_v2"."num", PrivcmdMmapbatchV2, num),
        field!("privcmd_mmapbatch_v2"."dom", PrivcmdMmapbatchV2, dom),
        field!("privcmd_mmapbatch_v2"."addr", PrivcmdMmapbatchV2, addr),
        field!("privcmd_mmapbatch_v2"."arr", PrivcmdMmapbatchV2, arr),
        field!("privcmd_mmapbatch_v2"."err", PrivcmdMmapbatchV2, err),
        field!("privcmd_mmap_resource"."dom", PrivcmdMmapResource, dom),
        field!("privcmd_mmap_resource"."type", PrivcmdMmapResource, type_),
        field!("privcmd_mmap_resource"."id", PrivcmdMmapResource, id),
        field!("privcmd_mmap_resource"."idx", PrivcmdMmapResource, idx),
        field!("privcmd_mmap_resource"."num", PrivcmdMmapResource, num),
        field!("privcmd_mmap_resource"."addr", PrivcmdMmapResource, addr),
        field!("privcmd_dm_op_buf"."uptr", PrivcmdDmOpBuf, uptr),
        field!("privcmd_dm_op_buf"."size", PrivcmdDmOpBuf, size),
        field!("privcmd_dm_op"."dom", PrivcmdDmOp, dom),
        field!("privcmd_dm_op"."num", PrivcmdDmOp, num),
        field!("privcmd_dm_op"."ubufs", PrivcmdDmOp, ubufs),
        field!("ioctl_evtchn_bind_interdomain"."remote_domain", IoctlEvtchnBindInterdomain, remote_domain),
        field!("ioctl_evtchn_bind_interdomain"."remote_port", IoctlEvtchnBindInterdomain, remote_port),
        field!("ioctl_evtchn_notify"."port", IoctlEvtchnNotify, port),
        field!("ioctl_evtchn_unbind"."port", IoctlEvtchnUnbind, port),
        field!("ioctl_gntdev_grant_ref"."domid", IoctlGntdevGrantRef, domid),
        field!("ioctl_gntdev_grant_ref"."ref", IoctlGntdevGrantRef, gref),
        field!("ioctl_gntdev_map_grant_ref"."count", IoctlGntdevMapGrantRef, count),
        field!("ioctl_gntdev_map_grant_ref"."pad", IoctlGntdevMapGrantRef, pad),
        field!("ioctl_gntdev_map_grant_ref"."index", IoctlGntdevMapGrantRef, index),
        field!("ioctl_gntdev_map_grant_ref"."refs", IoctlGntdevMapGrantRef, refs),
        field!("ioctl_gntdev_unmap_grant_ref"."index", IoctlGntdevUnmapGrantRef, index),
        field!("ioctl_gntdev_unmap_grant_ref"."count", IoctlGntdevUnmapGrantRef, count),
        field!("ioctl_gntdev_unmap_grant_ref"."pad", IoctlGntdevUnmapGrantRef, pad),
        field!("ioctl_gntdev_unmap_notify"."index", IoctlGntdevUnmapNotify, index),
        field!("ioctl_gntdev_unmap_notify"."action", IoctlGntdevUnmapNotify, action),
        field!("ioctl_gntdev_unmap_notify"."event_channel_port", IoctlGntdevUnmapNotify, event_channel_port),
        field!("gntdev_grant_copy_segment"."source", GntdevGrantCopySegment, source),
        field!("gntdev_grant_copy_segment"."source.virt", GntdevGrantCopySegment, source.virt),
        field!("gntdev_grant_copy_segment"."source.foreign", GntdevGrantCopySegment, source.foreign),
        field!("gntdev_grant_copy_segment"."source.foreign.ref", GntdevGrantCopySegment, source.foreign.gref),
        field!("gntdev_grant_copy_segment"."source.foreign.offset", GntdevGrantCopySegment, source.foreign.offset),
        field!("gntdev_grant_copy_segment"."source.foreign.domid", GntdevGrantCopySegment, source.foreign.domid),
        field!("gntdev_grant_copy_segment"."dest", GntdevGrantCopySegment, dest),
        field!("gntdev_grant_copy_segment"."dest.virt", GntdevGrantCopySegment, dest.virt),
        field!("gntdev_grant_copy_segment"."dest.foreign.ref", GntdevGrantCopySegment, dest.foreign.gref),
        field!("gntdev_grant_copy_segment"."dest.foreign.offset", GntdevGrantCopySegment, dest.foreign.offset),
        field!("gntdev_grant_copy_segment"."dest.foreign.domid", GntdevGrantCopySegment, dest.foreign.domid),
        field!("gntdev_grant_copy_segment"."len", GntdevGrantCopySegment, len),
        field!("gntdev_grant_copy_segment"."flags", GntdevGrantCopySegment, flags),
        field!("gntdev_grant_copy_segment"."status", GntdevGrantCopySegment, status),
        field!("ioctl_gntdev_grant_copy"."count", IoctlGntdevGrantCopy, count),
        field!("ioctl_gntdev_grant_copy"."segments", IoctlGntdevGrantCopy, segments),
        field!("ioctl_gntalloc_alloc_gref"."domid", IoctlGntallocAllocGref, domid),
        field!("ioctl_gntalloc_alloc_gref"."flags", IoctlGntallocAllocGref, flags),
        field!("ioctl_gntalloc_alloc_gref"."count", IoctlGntallocAllocGref, count),
        field!("ioctl_gntalloc_alloc_gref"."index", IoctlGntallocAllocGref, index),
        field!("ioctl_gntalloc_alloc_gref"."gref_ids", IoctlGntallocAllocGref, gref_ids),
        field!("ioctl_gntalloc_dealloc_gref"."index", IoctlGntallocDeallocGref, index),
        field!("ioctl_gntalloc_dealloc_gref"."count", IoctlGntallocDeallocGref, count),
    ];
    v.extend(fields.into_iter().flatten());
    v
}

/// Stands in for `<xen/interface/xen.h>`, which privcmd.h includes but
/// linux-libc-dev does not ship: only the types privcmd.h takes from it.
const XEN_H_STUB: &str = "\
#include <stddef.h>
#include <stdint.h>
typedef uint16_t domid_t;
typedef uint64_t xen_pfn_t;
";

fn c_program(items: &[Item]) -> String {
    let mut src = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <linux/types.h>\n\
         #include <sys/ioctl.h>\n\
         typedef uint16_t domid_t;\ntypedef uint32_t grant_ref_t;\n\
         #include <xen/gntdev.h>\n#include <xen/gntalloc.h>\n#include <xen/privcmd.h>\n#include <xen/evtchn.h>\n\
         int main(void) {\n",
    );
    for (name, expr, _) in items {
        src += &format!("    printf(\"%s=%llu\\n\", \"{name}\", (unsigned long long)({expr}));\n");
    }
    src + "    return 0;\n}\n"
}

/// A temp dir removed on drop, pass or fail.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_c(items: &[Item]) -> HashMap<String, u64> {
    for h in ["gntdev.h", "gntalloc.h", "privcmd.h"] {
        let path = Path::new("/usr/include/xen").join(h);
        assert!(
            path.exists(),
            "{} is missing: install linux-libc-dev (this test checks the ABI and must not skip)",
            path.display()
        );
    }
    compile_and_run(items, "", "", &[], Some(XEN_H_STUB))
}

/// Compiles `items` into a C program (`header` included before `main`, the
/// linux uapi set when empty; `prelude` after it) and returns what it prints.
/// `stub`: the `xen/interface/xen.h` stand-in, first on the include path.
fn compile_and_run(
    items: &[Item],
    header: &str,
    prelude: &str,
    cflags: &[&str],
    stub: Option<&str>,
) -> HashMap<String, u64> {
    let tag = if stub.is_some() { "uapi" } else { "public" };
    let dir =
        TempDir(std::env::temp_dir().join(format!("xen-sys-layout-{tag}-{}", std::process::id())));
    fs::create_dir_all(dir.0.join("xen/interface")).unwrap();
    if let Some(stub) = stub {
        fs::write(dir.0.join("xen/interface/xen.h"), stub).unwrap();
    }
    let src = dir.0.join("layout.c");
    let exe = dir.0.join("layout");
    let mut program = c_program(items);
    if !header.is_empty() {
        let body = &program[program.find("int main").unwrap()..];
        program = format!("{header}{prelude}{body}");
    }
    fs::write(&src, program).unwrap();

    let out = Command::new("gcc")
        .args(["-std=gnu11", "-Wall", "-Werror"])
        .args(cflags)
        .arg("-I")
        .arg(&dir.0)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run gcc ({e}): install gcc and linux-libc-dev (this test must not skip)")
        });
    assert!(
        out.status.success(),
        "gcc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success(), "{} failed", exe.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (k, v) = line.split_once('=').unwrap();
            (k.to_owned(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn rust_definitions_match_the_linux_headers() {
    let items = items();
    let c = run_c(&items);
    compare(&items, &c);
}

fn compare(items: &[Item], c: &HashMap<String, u64>) {
    assert_eq!(c.len(), items.len(), "duplicate names in the table");
    let mismatches: Vec<String> = items
        .iter()
        .filter(|(name, _, rust)| c.get(*name) != Some(rust))
        .map(|(name, _, rust)| format!("{name}: C {:#x?}, Rust {rust:#x}", c.get(*name)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    println!("{} items match the headers", items.len());
}

/// Items of Xen's public headers (libxen-dev: `xen/hvm/dm_op.h`,
/// `xen/hvm/ioreq.h`, `xen/io/xs_wire.h`), compiled in a program of their own:
/// they define `domid_t` themselves and clash with the stub above.
fn xen_public_items() -> Vec<Item> {
    let mut v: Vec<Item> = vec![
        constant!(XEN_DMOP_CREATE_IOREQ_SERVER, "XEN_DMOP_create_ioreq_server"),
        constant!(
            XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER,
            "XEN_DMOP_map_io_range_to_ioreq_server"
        ),
        constant!(
            XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
            "XEN_DMOP_unmap_io_range_from_ioreq_server"
        ),
        constant!(
            XEN_DMOP_SET_IOREQ_SERVER_STATE,
            "XEN_DMOP_set_ioreq_server_state"
        ),
        constant!(
            XEN_DMOP_DESTROY_IOREQ_SERVER,
            "XEN_DMOP_destroy_ioreq_server"
        ),
        constant!(XEN_DMOP_SET_ISA_IRQ_LEVEL, "XEN_DMOP_set_isa_irq_level"),
        constant!(XEN_DMOP_NR_VCPUS, "XEN_DMOP_nr_vcpus"),
        constant!(HVM_IOREQSRV_BUFIOREQ_OFF),
        constant!(XEN_DMOP_IO_RANGE_PORT),
        constant!(XEN_DMOP_IO_RANGE_MEMORY),
        constant!(XENMEM_RESOURCE_IOREQ_SERVER, "XENMEM_resource_ioreq_server"),
        (
            "XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0",
            "XENMEM_resource_ioreq_server_frame_ioreq(0)",
            XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0 as u64,
        ),
        constant!(IOREQ_READ),
        constant!(IOREQ_WRITE),
        constant!(STATE_IOREQ_NONE),
        constant!(STATE_IOREQ_READY),
        constant!(STATE_IOREQ_INPROCESS),
        constant!(STATE_IORESP_READY),
        constant!(IOREQ_TYPE_PIO),
        constant!(IOREQ_TYPE_COPY),
        constant!(IOREQ_TYPE_PCI_CONFIG),
        constant!(IOREQ_TYPE_TIMEOFFSET),
        constant!(IOREQ_TYPE_INVALIDATE),
        constant!(XS_DIRECTORY),
        constant!(XS_READ),
        constant!(XS_ERROR),
        constant!(XENSTORE_PAYLOAD_MAX),
        sizeof!("xen_dm_op", XenDmOp),
        sizeof!("xen_dm_op_create_ioreq_server", XenDmOpCreateIoreqServer),
        sizeof!("xen_dm_op_ioreq_server_range", XenDmOpIoreqServerRange),
        sizeof!(
            "xen_dm_op_set_ioreq_server_state",
            XenDmOpSetIoreqServerState
        ),
        sizeof!("xen_dm_op_destroy_ioreq_server", XenDmOpDestroyIoreqServer),
        sizeof!("xen_dm_op_set_isa_irq_level", XenDmOpSetIsaIrqLevel),
        sizeof!("xen_dm_op_nr_vcpus", XenDmOpNrVcpus),
        sizeof!("ioreq", Ioreq),
        sizeof!("xsd_sockmsg", XsdSockmsg),
    ];
    let fields = [
        field!("xen_dm_op"."op", XenDmOp, op),
        field!("xen_dm_op"."pad", XenDmOp, pad),
        field!("xen_dm_op"."u", XenDmOp, u),
        field!("xen_dm_op_create_ioreq_server"."handle_bufioreq", XenDmOpCreateIoreqServer, handle_bufioreq),
        field!("xen_dm_op_create_ioreq_server"."id", XenDmOpCreateIoreqServer, id),
        field!("xen_dm_op_ioreq_server_range"."id", XenDmOpIoreqServerRange, id),
        field!("xen_dm_op_ioreq_server_range"."type", XenDmOpIoreqServerRange, type_),
        field!("xen_dm_op_ioreq_server_range"."start", XenDmOpIoreqServerRange, start),
        field!("xen_dm_op_ioreq_server_range"."end", XenDmOpIoreqServerRange, end),
        field!("xen_dm_op_set_ioreq_server_state"."id", XenDmOpSetIoreqServerState, id),
        field!("xen_dm_op_set_ioreq_server_state"."enabled", XenDmOpSetIoreqServerState, enabled),
        field!("xen_dm_op_destroy_ioreq_server"."id", XenDmOpDestroyIoreqServer, id),
        field!("xen_dm_op_set_isa_irq_level"."isa_irq", XenDmOpSetIsaIrqLevel, isa_irq),
        field!("xen_dm_op_set_isa_irq_level"."level", XenDmOpSetIsaIrqLevel, level),
        field!("xen_dm_op_nr_vcpus"."vcpus", XenDmOpNrVcpus, vcpus),
        field!("ioreq"."addr", Ioreq, addr),
        field!("ioreq"."data", Ioreq, data),
        field!("ioreq"."count", Ioreq, count),
        field!("ioreq"."size", Ioreq, size),
        field!("ioreq"."vp_eport", Ioreq, vp_eport),
        field!("ioreq"."type", Ioreq, type_),
        field!("xsd_sockmsg"."type", XsdSockmsg, type_),
        field!("xsd_sockmsg"."req_id", XsdSockmsg, req_id),
        field!("xsd_sockmsg"."tx_id", XsdSockmsg, tx_id),
        field!("xsd_sockmsg"."len", XsdSockmsg, len),
    ];
    v.extend(fields.into_iter().flatten());
    v
}

/// The C bitfield byte of `struct ioreq`: set each field in C and read the
/// byte at `IOREQ_BITS_OFFSET`, against `Ioreq::pack_bits`.
const IOREQ_BITS_PROBE: &str = "\
static unsigned long long ioreq_bits(unsigned s, unsigned p, unsigned d, unsigned f) {
    struct ioreq r; memset(&r, 0, sizeof r);
    r.state = s; r.data_is_ptr = p; r.dir = d; r.df = f;
    return ((unsigned char *)&r)[30];
}
";

#[test]
fn rust_definitions_match_the_xen_public_headers() {
    let mut items = xen_public_items();
    for (s, p, d, f) in [
        (1u8, false, 1u8, false),
        (3, true, 0, true),
        (2, false, 1, true),
    ] {
        let name: &'static str = Box::leak(format!("ioreq bits {s} {p} {d} {f}").into_boxed_str());
        let expr: &'static str = Box::leak(
            format!("ioreq_bits({s}, {}, {d}, {})", u8::from(p), u8::from(f)).into_boxed_str(),
        );
        items.push((name, expr, u64::from(Ioreq::pack_bits(s, p, d, f))));
    }
    let header = "#include <stdio.h>\n#include <stddef.h>\n#include <string.h>\n#include <stdint.h>\n\
                  #include <xen/xen.h>\n#include <xen/hvm/dm_op.h>\n#include <xen/hvm/ioreq.h>\n\
                  #include <xen/hvm/hvm_op.h>\n#include <xen/memory.h>\n#include <xen/io/xs_wire.h>\n";
    let path = Path::new("/usr/include/xen/hvm/dm_op.h");
    assert!(
        path.exists(),
        "{} is missing: install libxen-dev (this test checks the ABI and must not skip)",
        path.display()
    );
    let c = compile_and_run(&items, header, IOREQ_BITS_PROBE, &["-D__XEN_TOOLS__"], None);
    compare(&items, &c);
}
