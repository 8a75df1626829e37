//! Bindings of each supported contract version, and their conversion into
//! the host's own types ([`super::types`]).
//!
//! One module per frozen `wit/vX.Y.Z/`. Adding a contract version means a new
//! module here and a new arm in [`super::ContractVersion`]; old plugins keep
//! loading. What versions share (`types`, `hooks`, `log`) is written once, in
//! [`shared_conversions`], and expanded in each module against its own
//! bindgen types.

/// Conversions and checks of what every contract version shares: `types` of
/// 0.1.0, interface `hooks` and `log`. Expanded inside a version's module,
/// where `wit` is that version's `types` and `HOOKS_INTERFACE` its name.
macro_rules! shared_conversions {
    () => {
        impl From<wit::EngineInfo> for host::EngineInfo {
            fn from(v: wit::EngineInfo) -> Self {
                host::EngineInfo { name: v.name, plugin_version: v.plugin_version, snapshot_format: v.snapshot_format }
            }
        }

        impl From<wit::ShardPosition> for host::ShardPosition {
            fn from(v: wit::ShardPosition) -> Self {
                host::ShardPosition { term: v.term, position: v.position }
            }
        }

        impl From<wit::SnapshotMeta> for host::SnapshotMeta {
            fn from(v: wit::SnapshotMeta) -> Self {
                host::SnapshotMeta { term: v.term, position: v.position, attributes: v.attributes }
            }
        }

        impl From<&host::SnapshotMeta> for wit::SnapshotMeta {
            fn from(v: &host::SnapshotMeta) -> Self {
                wit::SnapshotMeta { term: v.term, position: v.position, attributes: v.attributes.clone() }
            }
        }

        pub fn plan(v: wit::SnapshotPlan) -> Result<host::SnapshotPlan, ReplyError> {
            let entries = v
                .entries
                .into_iter()
                .map(|e| match e {
                    wit::Entry::File(f) => RawEntry::File { path: f.path, offset: f.offset, length: f.length },
                    wit::Entry::Inline(i) => RawEntry::Inline { path: i.path, contents: i.contents },
                })
                .collect();
            host::SnapshotPlan::from_guest(v.meta.into(), entries)
        }

        /// Checks the type of every hook of interface `hooks` on a live
        /// instance. Bindgen's pre-instance resolves exports but checks
        /// types only at the first call; a plugin with a wrong signature must
        /// be refused when loaded, not mid-transfer.
        fn typecheck_hooks<T: 'static>(
            store: &mut wasmtime::Store<T>,
            instance: &wasmtime::component::Instance,
        ) -> Result<(), String> {
            let hooks = instance
                .get_export_index(&mut *store, None, HOOKS_INTERFACE)
                .ok_or_else(|| format!("{HOOKS_INTERFACE} is not exported"))?;
            let mut lookup = |name: &str| {
                instance
                    .get_export_index(&mut *store, Some(&hooks), name)
                    .ok_or_else(|| format!("{name} is not exported"))
            };
            let (describe, status, create, term, validate, apply) = (
                lookup("describe")?,
                lookup("shard-status")?,
                lookup("create-snapshot")?,
                lookup("term-check")?,
                lookup("validate")?,
                lookup("apply")?,
            );
            type Status = (Result<wit::ShardPosition, wit::EngineError>,);
            type Unit = (Result<(), wit::EngineError>,);
            instance.get_typed_func::<(), (wit::EngineInfo,)>(&mut *store, &describe).map_err(why("describe"))?;
            instance.get_typed_func::<(&str,), Status>(&mut *store, &status).map_err(why("shard-status"))?;
            instance
                .get_typed_func::<(&str,), (Result<wit::SnapshotPlan, wit::EngineError>,)>(&mut *store, &create)
                .map_err(why("create-snapshot"))?;
            instance
                .get_typed_func::<(&str, &wit::SnapshotMeta), Unit>(&mut *store, &term)
                .map_err(why("term-check"))?;
            instance
                .get_typed_func::<(&str, &wit::SnapshotMeta), Status>(&mut *store, &validate)
                .map_err(why("validate"))?;
            instance.get_typed_func::<(&str, &wit::SnapshotMeta), Unit>(&mut *store, &apply).map_err(why("apply"))?;
            Ok(())
        }

        fn why(name: &'static str) -> impl Fn(wasmtime::Error) -> String {
            move |e| format!("{name}: {}", crate::plugin::runtime::error_chain(&e))
        }

        pub fn level(level: ferry::engine::log::Level) -> tracing::Level {
            use ferry::engine::log::Level;
            match level {
                Level::Trace => tracing::Level::TRACE,
                Level::Debug => tracing::Level::DEBUG,
                Level::Info => tracing::Level::INFO,
                Level::Warn => tracing::Level::WARN,
                Level::Error => tracing::Level::ERROR,
            }
        }
    };
}

pub mod v0_1_0 {
    wasmtime::component::bindgen!({
        world: "engine",
        path: "../wit/v0.1.0",
        imports: { default: async },
        exports: { default: async },
    });

    use crate::plugin::types::{self as host, RawEntry, ReplyError, guest_message};
    use ferry::engine::types as wit;

    /// The exported interface's name in a component of this version.
    pub const HOOKS_INTERFACE: &str = "ferry:engine/hooks@0.1.0";

    shared_conversions!();

    impl From<wit::EngineError> for host::EngineError {
        fn from(v: wit::EngineError) -> Self {
            match v {
                wit::EngineError::Invalid(m) => host::EngineError::Invalid(guest_message(m)),
                wit::EngineError::Io(m) => host::EngineError::Io(guest_message(m)),
                wit::EngineError::TermChanged(m) => host::EngineError::TermChanged(guest_message(m)),
                wit::EngineError::Unsupported(m) => host::EngineError::Unsupported(guest_message(m)),
                wit::EngineError::Other(m) => host::EngineError::Other(guest_message(m)),
            }
        }
    }

    /// Checks every hook's type on a live instance (see `typecheck_hooks`).
    pub fn typecheck<T: 'static>(
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::component::Instance,
    ) -> Result<(), String> {
        typecheck_hooks(store, instance)
    }
}

pub mod v0_2_0 {
    wasmtime::component::bindgen!({
        world: "engine",
        path: "../wit/v0.2.0",
        imports: { default: async },
        exports: { default: async },
    });

    use crate::plugin::types::{self as host, RawDeltaEntry, RawEntry, RawFileLock, ReplyError, guest_message};
    use ferry::engine::types as wit;

    /// The exported interface's name in a component of this version.
    pub const HOOKS_INTERFACE: &str = "ferry:engine/hooks@0.2.0";
    /// The live-move interface every 0.2.0 component exports.
    pub const LIVE_INTERFACE: &str = "ferry:engine/live@0.2.0";
    /// The optional interface of world `engine-with-file-checks`.
    pub const FILE_CHECKS_INTERFACE: &str = "ferry:engine/file-checks@0.2.0";

    /// `check-files(shard, meta, paths) -> result<_, engine-error>`.
    type CheckFilesFunc<'a> =
        wasmtime::component::TypedFunc<(&'a str, &'a wit::SnapshotMeta, &'a [String]), (Result<(), wit::EngineError>,)>;

    /// `check-files` of interface `file-checks`, typed. It is not in world
    /// `engine`'s bindings: a component exports it or not, and the same
    /// bindings serve both worlds.
    fn check_files_func<'a, T: 'static>(
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::component::Instance,
    ) -> Result<CheckFilesFunc<'a>, String> {
        let checks = instance
            .get_export_index(&mut *store, None, FILE_CHECKS_INTERFACE)
            .ok_or_else(|| format!("{FILE_CHECKS_INTERFACE} is not exported"))?;
        let func = instance
            .get_export_index(&mut *store, Some(&checks), "check-files")
            .ok_or_else(|| "check-files is not exported".to_owned())?;
        instance.get_typed_func(&mut *store, func).map_err(why("check-files"))
    }

    /// Checks `check-files`' type on a live instance (see `typecheck_hooks`).
    pub fn typecheck_file_checks<T: 'static>(
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::component::Instance,
    ) -> Result<(), String> {
        check_files_func(store, instance).map(drop)
    }

    /// Calls `check-files` on a fresh instance.
    pub async fn call_check_files<T: Send + 'static>(
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::component::Instance,
        shard: &str,
        meta: &wit::SnapshotMeta,
        paths: &[String],
    ) -> wasmtime::Result<Result<(), wit::EngineError>> {
        let func = check_files_func(store, instance).map_err(wasmtime::Error::msg)?;
        let (result,) = func.call_async(&mut *store, (shard, meta, paths)).await?;
        Ok(result)
    }

    shared_conversions!();

    impl From<wit::EngineError> for host::EngineError {
        fn from(v: wit::EngineError) -> Self {
            match v {
                wit::EngineError::Invalid(m) => host::EngineError::Invalid(guest_message(m)),
                wit::EngineError::Io(m) => host::EngineError::Io(guest_message(m)),
                wit::EngineError::TermChanged(m) => host::EngineError::TermChanged(guest_message(m)),
                wit::EngineError::Unsupported(m) => host::EngineError::Unsupported(guest_message(m)),
                wit::EngineError::Other(m) => host::EngineError::Other(guest_message(m)),
                wit::EngineError::HistoryGone(m) => host::EngineError::HistoryGone(guest_message(m)),
                wit::EngineError::Fenced(m) => host::EngineError::Fenced(guest_message(m)),
            }
        }
    }

    impl From<host::ShardPosition> for wit::ShardPosition {
        fn from(v: host::ShardPosition) -> Self {
            wit::ShardPosition { term: v.term, position: v.position }
        }
    }

    impl From<wit::DeltaMeta> for host::DeltaMeta {
        fn from(v: wit::DeltaMeta) -> Self {
            host::DeltaMeta { term: v.term, since: v.since, until: v.until, attributes: v.attributes }
        }
    }

    impl From<&host::DeltaMeta> for wit::DeltaMeta {
        fn from(v: &host::DeltaMeta) -> Self {
            wit::DeltaMeta { term: v.term, since: v.since, until: v.until, attributes: v.attributes.clone() }
        }
    }

    pub fn delta_plan(v: wit::DeltaPlan) -> Result<host::DeltaPlan, ReplyError> {
        let entries = v
            .entries
            .into_iter()
            .map(|e| match e {
                wit::DeltaEntry::Range(r) => RawDeltaEntry::Range { path: r.path, offset: r.offset, length: r.length },
                wit::DeltaEntry::BlockDiff(b) => {
                    RawDeltaEntry::BlockDiff { path: b.path, block_size: b.block_size, length: b.length }
                }
                wit::DeltaEntry::Inline(i) => RawDeltaEntry::Inline { path: i.path, contents: i.contents },
                wit::DeltaEntry::Remove(path) => RawDeltaEntry::Remove { path },
            })
            .collect();
        host::DeltaPlan::from_guest(v.meta.into(), entries)
    }

    pub fn fence_info(v: wit::FenceInfo) -> Result<host::FenceInfo, ReplyError> {
        let locks = v
            .locks
            .into_iter()
            .map(|l| RawFileLock { path: l.path, offset: l.offset, length: l.length, exclusive: l.exclusive })
            .collect();
        host::FenceInfo::from_guest(v.last.into(), locks)
    }

    /// Checks every hook's type on a live instance, `live`'s included (see
    /// `typecheck_hooks`).
    pub fn typecheck<T: 'static>(
        store: &mut wasmtime::Store<T>,
        instance: &wasmtime::component::Instance,
    ) -> Result<(), String> {
        typecheck_hooks(store, instance)?;
        let live = instance
            .get_export_index(&mut *store, None, LIVE_INTERFACE)
            .ok_or_else(|| format!("{LIVE_INTERFACE} is not exported"))?;
        let mut lookup = |name: &str| {
            instance.get_export_index(&mut *store, Some(&live), name).ok_or_else(|| format!("{name} is not exported"))
        };
        let (changes, check, apply, fence, unfence, retire) = (
            lookup("changes-since")?,
            lookup("delta-check")?,
            lookup("apply-changes")?,
            lookup("fence")?,
            lookup("unfence")?,
            lookup("retire")?,
        );
        type Unit = (Result<(), wit::EngineError>,);
        instance
            .get_typed_func::<(&str, wit::ShardPosition), (Result<wit::DeltaPlan, wit::EngineError>,)>(
                &mut *store,
                &changes,
            )
            .map_err(why("changes-since"))?;
        instance.get_typed_func::<(&str, &wit::DeltaMeta), Unit>(&mut *store, &check).map_err(why("delta-check"))?;
        instance
            .get_typed_func::<(&str, &wit::DeltaMeta), (Result<wit::ShardPosition, wit::EngineError>,)>(
                &mut *store,
                &apply,
            )
            .map_err(why("apply-changes"))?;
        instance
            .get_typed_func::<(&str, u64), (Result<wit::FenceInfo, wit::EngineError>,)>(&mut *store, &fence)
            .map_err(why("fence"))?;
        instance.get_typed_func::<(&str, u64), Unit>(&mut *store, &unfence).map_err(why("unfence"))?;
        instance.get_typed_func::<(&str, u64), Unit>(&mut *store, &retire).map_err(why("retire"))?;
        Ok(())
    }
}
