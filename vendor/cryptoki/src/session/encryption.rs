// Copyright 2021 Contributors to the Parsec project.
// SPDX-License-Identifier: Apache-2.0
//! Encrypting data

use crate::context::Function;
use crate::error::{Result, Rv};
use crate::mechanism::Mechanism;
use crate::object::ObjectHandle;
use crate::session::Session;
use cryptoki_sys::*;
use std::convert::TryInto;

impl Session {

    /// Single-part encryption with one `C_Encrypt` call into a buffer of `capacity` bytes (keybroker
    /// patch). [`Session::encrypt`] first asks the token for the output length, and soft tokens such
    /// as SoftHSM2 do the whole operation to answer that, so every operation costs twice. If the
    /// token reports `CKR_BUFFER_TOO_SMALL`, the operation stays active (PKCS#11 §5.2) and the
    /// call is repeated once with the size it asked for.
    pub fn encrypt_sized(
        &self,
        mechanism: &Mechanism,
        key: ObjectHandle,
        input: &[u8],
        capacity: usize,
    ) -> Result<Vec<u8>> {
        let mut mechanism: CK_MECHANISM = mechanism.into();
        unsafe {
            Rv::from(get_pkcs11!(self.client(), C_EncryptInit)(
                self.handle(),
                &mut mechanism as CK_MECHANISM_PTR,
                key.handle(),
            ))
            .into_result(Function::EncryptInit)?;
        }
        let mut out = vec![0; capacity];
        let mut out_len: CK_ULONG = out.len().try_into()?;
        let rv = unsafe {
            Rv::from(get_pkcs11!(self.client(), C_Encrypt)(
                self.handle(),
                input.as_ptr() as *mut u8,
                input.len().try_into()?,
                out.as_mut_ptr(),
                &mut out_len,
            ))
        };
        match rv {
            Rv::Error(crate::error::RvError::BufferTooSmall) => {
                out.resize(out_len.try_into()?, 0);
                unsafe {
                    Rv::from(get_pkcs11!(self.client(), C_Encrypt)(
                        self.handle(),
                        input.as_ptr() as *mut u8,
                        input.len().try_into()?,
                        out.as_mut_ptr(),
                        &mut out_len,
                    ))
                    .into_result(Function::Encrypt)?;
                }
            }
            rv => rv.into_result(Function::Encrypt)?,
        }
        out.truncate(out_len.try_into()?);
        Ok(out)
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
