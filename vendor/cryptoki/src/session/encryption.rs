// Copyright 2021 Contributors to the Parsec project.
// SPDX-License-Identifier: Apache-2.0
//! Encrypting data

use crate::context::Function;
use crate::error::{Result, Rv};
use crate::mechanism::Mechanism;
use crate::object::ObjectHandle;
use crate::session::sized::SinglePart;
use crate::session::Session;
use cryptoki_sys::*;
use std::convert::TryInto;

impl Session {
    /// Single-part encryption with one `C_Encrypt` call into a buffer of `capacity` bytes (keybroker
    /// patch: not in cryptoki 0.12.1). [`Session::encrypt`] first asks the token for the output
    /// length, and soft tokens such as SoftHSM2 do the whole operation to answer that, so every
    /// operation costs twice. If `capacity` is too small, the call is repeated once with the
    /// size the token asks for; if that is still too small, the operation is ended before
    /// `CKR_BUFFER_TOO_SMALL` is returned, or, if the token cannot be made to end it,
    /// `CKR_OPERATION_ACTIVE` is returned and the session must be closed rather than reused.
    pub fn encrypt_sized(
        &self,
        mechanism: &Mechanism,
        key: ObjectHandle,
        input: &[u8],
        capacity: usize,
    ) -> Result<Vec<u8>> {
        let op = SinglePart {
            init: get_pkcs11!(self.client(), C_EncryptInit),
            call: get_pkcs11!(self.client(), C_Encrypt),
            init_fn: Function::EncryptInit,
            call_fn: Function::Encrypt,
        };
        self.single_part_sized(op, mechanism, key, input, capacity)
    }

    /// Single-part encryption operation
    pub fn encrypt(
        &self,
        mechanism: &Mechanism,
        key: ObjectHandle,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut mechanism: CK_MECHANISM = mechanism.into();
        let mut encrypted_data_len = 0;

        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptInit)(
                self.handle(),
                &mut mechanism as CK_MECHANISM_PTR,
                key.handle(),
            ))
            .into_result(Function::EncryptInit)?;
        }

        // Get the output buffer length
        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_Encrypt)(
                self.handle(),
                data.as_ptr() as *mut u8,
                data.len().try_into()?,
                std::ptr::null_mut(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::Encrypt)?;
        }

        let mut encrypted_data = vec![0; encrypted_data_len.try_into()?];

        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_Encrypt)(
                self.handle(),
                data.as_ptr() as *mut u8,
                data.len().try_into()?,
                encrypted_data.as_mut_ptr(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::Encrypt)?;
        }

        encrypted_data.truncate(encrypted_data_len.try_into()?);

        Ok(encrypted_data)
    }

    /// Starts new multi-part encryption operation
    pub fn encrypt_init(&self, mechanism: &Mechanism, key: ObjectHandle) -> Result<()> {
        let mut mechanism: CK_MECHANISM = mechanism.into();

        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptInit)(
                self.handle(),
                &mut mechanism as CK_MECHANISM_PTR,
                key.handle(),
            ))
            .into_result(Function::EncryptInit)?;
        }

        Ok(())
    }

    /// Continues an ongoing multi-part encryption operation,
    /// taking in the next part of the data and returning its encryption
    pub fn encrypt_update(&self, data: &[u8]) -> Result<Vec<u8>> {
        let mut encrypted_data_len = 0;

        // Get the output buffer length
        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptUpdate)(
                self.handle(),
                data.as_ptr() as *mut u8,
                data.len().try_into()?,
                std::ptr::null_mut(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::EncryptUpdate)?;
        }

        let mut encrypted_data = vec![0; encrypted_data_len.try_into()?];

        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptUpdate)(
                self.handle(),
                data.as_ptr() as *mut u8,
                data.len().try_into()?,
                encrypted_data.as_mut_ptr(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::EncryptUpdate)?;
        }

        encrypted_data.truncate(encrypted_data_len.try_into()?);

        Ok(encrypted_data)
    }

    /// Finalizes ongoing multi-part encryption operation,
    /// returning any remaining bytes in the encrypted data
    pub fn encrypt_final(&self) -> Result<Vec<u8>> {
        let mut encrypted_data_len = 0;

        // Get the output buffer length
        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptFinal)(
                self.handle(),
                std::ptr::null_mut(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::EncryptFinal)?;
        }

        let mut encrypted_data = vec![0; encrypted_data_len.try_into()?];

        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptFinal)(
                self.handle(),
                encrypted_data.as_mut_ptr(),
                &mut encrypted_data_len,
            ))
            .into_result(Function::EncryptFinal)?;
        }

        encrypted_data.truncate(encrypted_data_len.try_into()?);

        Ok(encrypted_data)
    }
}
