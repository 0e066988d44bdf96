//! `openshell:compute/{network,rootfs,vm}`: microVMs and their networks.
//! Not provided by this build: every call answers `unavailable` with a
//! message, so a VM driver fails its sandbox clearly instead of hanging.

use wasmtime::component::Resource;

use crate::bindings::openshell::compute::network::{self, HostVmNetwork};
use crate::bindings::openshell::compute::rootfs::{self, HostStagedRootfs};
use crate::bindings::openshell::compute::vm::{self, Backend, HostMicrovm, VmSpec, VmStatus};
use crate::bindings::types::CapError;
use crate::caps::CallState;

const NO_VMS: &str = "this gateway has no VM backend configured";

#[derive(Debug)]
pub struct NetworkHandle;
#[derive(Debug)]
pub struct RootfsHandle;
#[derive(Debug)]
pub struct VmHandle;

impl network::Host for CallState {
    async fn start(&mut self) -> wasmtime::Result<Result<Resource<NetworkHandle>, CapError>> {
        Ok(Err(CapError::Unavailable(NO_VMS.into())))
    }
}

impl HostVmNetwork for CallState {
    async fn guest_endpoint(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<String> {
        self.table.get(&h)?;
        Ok(String::new())
    }

    async fn drop(&mut self, h: Resource<NetworkHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}

impl rootfs::Host for CallState {
    async fn stage(&mut self) -> wasmtime::Result<Result<Resource<RootfsHandle>, CapError>> {
        Ok(Err(CapError::Unavailable(NO_VMS.into())))
    }
}

impl HostStagedRootfs for CallState {
    async fn write_file(
        &mut self,
        h: Resource<RootfsHandle>,
        _path: String,
        _contents: Vec<u8>,
        _mode: u32,
    ) -> wasmtime::Result<Result<(), CapError>> {
        self.table.get(&h)?;
        Ok(Err(CapError::Unavailable(NO_VMS.into())))
    }

    async fn drop(&mut self, h: Resource<RootfsHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}

impl vm::Host for CallState {
    async fn launch(
        &mut self,
        _spec: VmSpec,
        _root: Resource<RootfsHandle>,
        _net: Resource<NetworkHandle>,
    ) -> wasmtime::Result<Result<Resource<VmHandle>, CapError>> {
        Ok(Err(CapError::Unavailable(NO_VMS.into())))
    }

    async fn current(&mut self) -> wasmtime::Result<Option<Resource<VmHandle>>> {
        Ok(None)
    }
}

impl HostMicrovm for CallState {
    async fn backend(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<Backend> {
        self.table.get(&h)?;
        Ok(Backend::QemuTcg)
    }

    async fn status(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<VmStatus> {
        self.table.get(&h)?;
        Ok(VmStatus::Exited(-1))
    }

    async fn stop(
        &mut self,
        h: Resource<VmHandle>,
        _grace_ms: u32,
    ) -> wasmtime::Result<Result<i32, CapError>> {
        self.table.get(&h)?;
        Ok(Err(CapError::Unavailable(NO_VMS.into())))
    }

    async fn drop(&mut self, h: Resource<VmHandle>) -> wasmtime::Result<()> {
        self.table.delete(h)?;
        Ok(())
    }
}
